"""The shipped Prometheus config, alert rules and Grafana dashboards against a live swarm and a real Prometheus.

A coordinator in-process (with its DHT) and three real ``swarm peer --coordinator`` processes on
127.0.0.1: each joins, gets its span and the DHT's initial peers from the coordinator, heartbeats and
reports evals. Two of them train through the chain (whatever spans they get, some span has two
replicas that receive gradients, so real all-reduces happen); the third only serves.

Prometheus (Debian's package) runs deploy/prometheus/prometheus.yml with only the targets and
intervals rewritten. Skipped only when the prometheus binary is absent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from coordinator.server import CoordinatorConfig, CoordinatorServer, serve
from swarm import __version__
from swarm.config import BaseModelRef, DataSettings, EndCondition, OptimizerSettings, RoundSpec, split_even
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc
from tests.identities import coordinator_channel

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(85),
    pytest.mark.skipif(PROMETHEUS is None, reason="needs the prometheus binary (apt-get install prometheus)"),
]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
TOKEN = "mon-token"
RATE_WINDOW = "1m"  # stands in for Grafana's $__rate_interval


def _poll(
    condition: Callable[[], bool], deadline_s: float, what: str, interval: float = 0.2,
    detail: Callable[[], object] = lambda: "",
) -> None:  # fmt: skip
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {deadline_s} s waiting for {what} {detail()}"
        time.sleep(interval)


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return bytes(r.read())


@dataclass
class Peer:
    name: str
    trainer: bool
    proc: subprocess.Popen[bytes] | None = None
    events: Path = Path()
    log: Path = Path()
    metrics_port: int = 0
    peer_id: str = ""
    span: str = ""

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def read_events(self) -> list[dict[str, Any]]:
        if not self.events.is_file():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line.strip()]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else "(no log)"

    def is_ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.log_tail()}"
        for e in self.read_events():
            if e["event"] == "ready":
                self.metrics_port, self.peer_id, self.span = (
                    int(e["metrics_port"]),
                    e["peer_id"],
                    "-".join(map(str, e["span"])),
                )
        return bool(self.metrics_port)


def _start_peer(peer: Peer, index: int, workdir: Path, coordinator: CoordinatorServer, data: Path) -> None:
    peer.events, peer.log = workdir / f"{peer.name}.events.jsonl", workdir / f"{peer.name}.log"
    args = [sys.executable, "-m", "swarm.cli", "peer", "--coordinator", coordinator.address,
            "--coordinator-public-key", str(coordinator.public_key_path), "--join-token", TOKEN,
            "--identity-path", str(workdir / f"{peer.name}.key"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
            "--device", "cpu", "--threads", "1", "--metrics-port", "0", "--events-file", str(peer.events),
            "--announce-period", "1", "--request-timeout", "5"]  # fmt: skip
    args += (
        ["--trainer", "--data", str(data), "--num-shards", "2", "--shard-index", str(index)]
        if peer.trainer
        else ["--no-trainer"]
    )
    with peer.log.open("wb") as log:
        peer.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)


def _stop_processes(procs: list[subprocess.Popen[bytes] | None], grace_s: float) -> None:
    """SIGTERM all, wait up to ``grace_s`` together, then SIGKILL each process group this test created.

    Every process was started with ``start_new_session=True``: its group id is its pid, and the group
    holds its children (hivemind's p2pd, torch's helpers) and nothing else.
    """
    running = [p for p in procs if p is not None]
    for proc in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(deadline - time.monotonic(), 0.01))
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@dataclass
class Swarm:
    coordinator: CoordinatorServer
    peers: list[Peer]
    prometheus_url: str
    config_path: Path

    @property
    def coordinator_metrics(self) -> str:
        assert self.coordinator.metrics_url is not None
        return self.coordinator.metrics_url

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            return dict(json.loads(_get(url)))
        except urllib.error.HTTPError as e:  # 400 with a JSON body naming the parse error
            return dict(json.loads(e.read()))


def render_prometheus_config(out_dir: Path, coordinator: str, peers: list[str]) -> Path:
    """The shipped deploy/prometheus directory with live targets and 1 s intervals substituted."""
    shutil.copytree(DEPLOY / "prometheus", out_dir)
    config = yaml.safe_load((out_dir / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"swarm-coordinator", "swarm-peers"}, f"unexpected scrape jobs {sorted(jobs)}"
    jobs["swarm-coordinator"]["static_configs"] = [{"targets": [coordinator]}]
    jobs["swarm-peers"]["static_configs"] = [{"targets": peers}]
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _start_prometheus(config: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    log_path = workdir / "prometheus.log"
    assert PROMETHEUS is not None
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             "--web.listen-address=127.0.0.1:0", "--log.level=info"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True,
        )  # fmt: skip
    found: list[str] = []

    def listening() -> bool:
        assert proc.poll() is None, f"prometheus exited: {log_path.read_text()[-2000:]}"
        found[:] = re.findall(r'msg="Listening on" address=([\d.]+:\d+)', log_path.read_text())
        return bool(found)

    _poll(listening, 20, "prometheus to listen")
    url = f"http://{found[0]}"
    _poll(lambda: _ready(url), 20, "prometheus /-/ready")
    return proc, url


def _ready(url: str) -> bool:
    try:
        return _get(url + "/-/ready").startswith(b"Prometheus")
    except OSError:
        return False


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    from swarm.basemodel import make_base
    from swarm.checkpoint import fingerprint
    from swarm.corpus import generate, write_jsonl

    workdir = tmp_path_factory.mktemp("monitoring")
    base = make_base(workdir / "base", layers=2, hidden=32, pretrain_steps=0, progress=False, use_cache=False)
    train = write_jsonl(generate("finetune", 200, seed=1), workdir / "data" / "train.jsonl")
    spec = RoundSpec(
        round_id="mon-1", base=BaseModelRef(path=str(base), fingerprint=fingerprint(base), num_layers=2),
        spans=split_even(2, 2), data=DataSettings(train_path=str(train), seq_len=32, micro_batch_size=4),
        optimizer=OptimizerSettings(target_batch_size=16, matchmaking_time=1.0, averaging_timeout=5.0),
        end=EndCondition(target_samples=10**8, target_epochs=10**6, deadline_s=3600),
    )  # fmt: skip
    coordinator = serve(CoordinatorConfig(
        host="127.0.0.1", port=0, metrics_port=0, workdir=workdir, store="memory", round_spec=spec, join_token=TOKEN,
        heartbeat_interval_s=1.0, heartbeat_timeout_s=60.0,
    ))  # fmt: skip
    peers = [Peer("peer-a", trainer=True), Peer("peer-b", trainer=True), Peer("peer-c", trainer=False)]
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        # a refused join, so the rejections panel has data
        with (
            coordinator_channel(coordinator.address, coordinator.tls_cert_path) as channel,
            pytest.raises(grpc.RpcError),
        ):
            request = pb.JoinRequest(peer_id="intruder", software_version=__version__, join_token="wrong")
            pb_grpc.CoordinatorStub(channel).Join(request, timeout=10)
        for i, peer in enumerate(peers):
            _start_peer(peer, i, workdir, coordinator, train)
        _poll(lambda: all([p.is_ready() for p in peers]), 75, "the peers' ready events")
        spans = sorted(p.span for p in peers)
        assert len(set(spans)) == 2, f"the coordinator left a span without a server: {spans}"
        config = render_prometheus_config(workdir / "prometheus", f"127.0.0.1:{coordinator.metrics_port}",
                                          [f"127.0.0.1:{p.metrics_port}" for p in peers])  # fmt: skip
        prometheus, url = _start_prometheus(config, workdir)
        yield Swarm(coordinator, peers, url, config)
    finally:
        _stop_processes([*(p.proc for p in peers), prometheus], grace_s=3.0)
        coordinator.stop(grace=0)


def _promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    assert PROMTOOL is not None, "promtool comes with prometheus"
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, timeout=30)


def test_promtool_accepts_config_rules_and_live_metrics(swarm: Swarm) -> None:
    result = _promtool("check", "config", str(swarm.config_path))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    result = _promtool("check", "rules", str(DEPLOY / "prometheus" / "rules.yml"))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    for url in (swarm.coordinator_metrics, *(p.metrics_url for p in swarm.peers)):
        text = _get(url)
        assert b"swarm_" in text
        result = _promtool("check", "metrics", stdin=text)
        assert result.returncode == 0 and not result.stdout.strip(), f"{url}: {result.stdout.decode()}"


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_evaluate_on_the_live_swarm(swarm: Swarm) -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} >= {"SwarmSpanWithoutServer", "SwarmPeerMissingHeartbeats",
                                           "SwarmAveragingFailureRate", "SwarmLossNaN", "SwarmTrainingLossRising",
                                           "SwarmRoundPastDeadline"}  # fmt: skip
    for rule in rules:
        answer = swarm.query(rule["expr"])
        assert answer["status"] == "success", f"{rule['alert']}: {answer.get('error')}"
    state: dict[str, Any] = {}

    def evaluated() -> bool:
        groups = json.loads(_get(swarm.prometheus_url + "/api/v1/rules"))["data"]["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        state["rules"] = loaded
        return len(loaded) == len(rules) and all(r.get("lastEvaluation", "").startswith("20") for r in loaded)

    _poll(evaluated, 20, "Prometheus to evaluate every rule", detail=lambda: state.get("rules"))
    bad = {r["name"]: r.get("lastError") for r in state["rules"] if r["health"] != "ok"}
    assert not bad, f"rules that fail to evaluate: {bad}"
    # a healthy swarm: every span served, the round within its deadline, no NaN, nobody expired
    active = json.loads(_get(swarm.prometheus_url + "/api/v1/alerts"))["data"]["alerts"]
    healthy = {"SwarmSpanWithoutServer", "SwarmRoundPastDeadline", "SwarmLossNaN", "SwarmPeersExpired",
               "SwarmCoordinatorDown", "SwarmMemberExpelled"}  # fmt: skip
    wrong = [(a["labels"]["alertname"], a["labels"]) for a in active if a["labels"]["alertname"] in healthy]
    assert not wrong, f"alerts on a healthy swarm: {wrong}"
    # a peer that stops heartbeating (frozen with SIGSTOP) shows up in SwarmPeerMissingHeartbeats within seconds
    silent = next(p for p in swarm.peers if not p.trainer)
    assert silent.proc is not None
    missing = next(r["expr"] for r in rules if r["alert"] == "SwarmPeerMissingHeartbeats")
    ages = "swarm_coordinator_member_heartbeat_age_seconds"
    os.kill(silent.proc.pid, signal.SIGSTOP)
    try:
        _poll(lambda: any(r["metric"].get("peer") == silent.peer_id for r in swarm.query(missing)["data"]["result"]),
              20, f"SwarmPeerMissingHeartbeats to name {silent.name}", detail=lambda: swarm.query(ages))  # fmt: skip
    finally:
        os.kill(silent.proc.pid, signal.SIGCONT)


def _dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))}


def _promql(expr: str) -> str:
    """A panel query as Prometheus sees it: Grafana's variables replaced (every peer for $instance)."""
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$instance", ".+")


def _has_finite_value(answer: dict[str, Any]) -> bool:
    result = answer.get("data", {}).get("result", [])
    values = [float(r["value"][1]) for r in result] if isinstance(result, list) else []
    return any(math.isfinite(v) for v in values)


def test_every_dashboard_panel_returns_data(swarm: Swarm) -> None:
    panels = [(name, p) for name, d in _dashboards().items() for p in d["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    missing: dict[str, str] = {}

    def all_panels_have_data() -> bool:
        missing.clear()
        for name, panel in panels:
            answers = [swarm.query(_promql(t["expr"])) for t in panel["targets"]]
            errors = [a.get("error") for a in answers if a["status"] != "success"]
            assert not errors, f"{name} / {panel['title']}: Prometheus rejects the query: {errors}"
            if not any(_has_finite_value(a) for a in answers):
                missing[f"{name} / {panel['title']}"] = "; ".join(_promql(t["expr"]) for t in panel["targets"])
        return not missing

    try:
        _poll(all_panels_have_data, 50, "every dashboard panel to return data", interval=1.0)
    except AssertionError:
        logs = "\n".join(f"--- {p.name}\n{p.log_tail()[-800:]}" for p in swarm.peers)
        raise AssertionError(f"panels without data: {json.dumps(missing, indent=1)}\n{logs}") from None
    # the "My peer" variable lists every live peer
    values = json.loads(_get(swarm.prometheus_url + "/api/v1/label/instance/values?match[]=swarm_peer_info"))["data"]
    assert sorted(values) == sorted(f"127.0.0.1:{p.metrics_port}" for p in swarm.peers)
    # the daemons' own heartbeats reached the coordinator: three live members, samples counted
    status = json.loads(_get(swarm.coordinator_metrics.replace("/metrics", "/api/status")))
    assert sorted(p["peer_id"] for p in status["peers"] if p["state"] == "live") == sorted(
        p.peer_id for p in swarm.peers
    )
    assert status["round"]["state"] == "training" and status["round"]["samples"] > 0
