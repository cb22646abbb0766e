"""The shipped Prometheus config, alert rules and Grafana dashboards against a live swarm and a real Prometheus.

A coordinator in-process (with its DHT) and three real ``swarm peer`` processes on 127.0.0.1: two serve
span 0-1 (so their LoRA gradients are all-reduced), one serves span 1-2 and trains through the chain.
The peers join the coordinator's DHT with the initial peers its Join answer names. Until the daemon
speaks to the coordinator itself, a relay thread here joins each peer (before it starts, with its
pre-generated libp2p identity, so the span the coordinator assigns is the span it hosts) and
heartbeats its live counters, read from its /metrics, to the coordinator.

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
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from coordinator.server import CoordinatorConfig, CoordinatorServer, serve
from swarm import __version__
from swarm.config import BaseModelRef, DataSettings, EndCondition, OptimizerSettings, RoundSpec, split_even
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc

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
    identity: Path
    peer_id: str
    span_index: int = -1
    trainer: bool = False
    proc: subprocess.Popen[bytes] | None = None
    events: Path = Path()
    log: Path = Path()
    metrics_port: int = 0
    reported_evals: set[float] = field(default_factory=set)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def read_events(self) -> list[dict[str, Any]]:
        if not self.events.is_file():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line.strip()]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else "(no log)"


def _new_identity(path: Path) -> str:
    from hivemind.p2p import P2P, PeerID

    P2P.generate_identity(str(path))
    return str(PeerID.from_identity(path.read_bytes()).to_base58())


def _start_peer(peer: Peer, workdir: Path, spec_path: Path, initial_peers: list[str], data: Path) -> None:
    peer.events, peer.log = workdir / f"{peer.name}.events.jsonl", workdir / f"{peer.name}.log"
    args = [sys.executable, "-m", "swarm.cli", "peer", "--round-spec", str(spec_path), "--span-index",
            str(peer.span_index), "--identity-path", str(peer.identity), "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
            "--device", "cpu", "--threads", "1", "--metrics-port", "0", "--events-file", str(peer.events),
            "--announce-period", "1"]  # fmt: skip
    for maddr in initial_peers:
        args += ["--initial-peers", maddr]
    args += ["--trainer", "--data", str(data)] if peer.trainer else ["--no-trainer"]
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


class Relay(threading.Thread):
    """Heartbeats each peer's live counters (from its /metrics) and its eval events to the coordinator."""

    def __init__(self, stub: pb_grpc.CoordinatorStub, round_id: str, peers: list[Peer], spans: list[pb.Span]):
        super().__init__(name="coordinator-relay", daemon=True)
        self.stub, self.round_id, self.peers, self.spans = stub, round_id, peers, spans
        self.stop_event = threading.Event()
        self.paused: set[str] = set()  # peer ids whose heartbeats are held back (fault injection)
        self.errors: list[str] = []
        self.beats = 0

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            for peer in self.peers:
                if peer.peer_id in self.paused:
                    continue
                try:
                    self._beat(peer)
                except (OSError, grpc.RpcError):
                    continue  # a peer that is starting or stopping; the next beat catches up
                except AssertionError as e:
                    self.errors.append(str(e))

    def _beat(self, peer: Peer) -> None:
        values: dict[str, float] = {}
        if peer.metrics_port:  # before the daemon is ready, an empty heartbeat keeps the membership alive
            for family in text_string_to_metric_families(_get(peer.metrics_url).decode()):
                for s in family.samples:
                    if not s.labels:
                        values[s.name] = s.value
        progress = pb.Progress(
            samples=int(values.get("swarm_peer_samples_total", 0)), tokens=int(values.get("swarm_peer_tokens_total", 0)),
            loss=values.get("swarm_peer_loss", 0.0), epoch=int(values.get("swarm_peer_epoch", 0)),
            throughput=values.get("swarm_peer_throughput", 0.0),
        )  # fmt: skip
        span = self.spans[peer.span_index]
        reply = self.stub.Heartbeat(pb.HeartbeatRequest(peer_id=peer.peer_id, round_id=self.round_id,
                                                        progress=progress, span=span), timeout=5)  # fmt: skip
        assert reply.ok, f"{peer.name} lost its membership: {reply.message}"  # would make every later check moot
        for e in peer.read_events():
            if e["event"] == "eval" and e["time"] not in peer.reported_evals:
                self.stub.ReportEval(pb.ReportEvalRequest(peer_id=peer.peer_id, round_id=self.round_id,
                                                          epoch=int(e["epoch"]), eval_loss=float(e["loss"]),
                                                          eval_tokens=int(e["tokens"])), timeout=5)  # fmt: skip
                peer.reported_evals.add(e["time"])
        self.beats += 1


@dataclass
class Swarm:
    coordinator: CoordinatorServer
    peers: list[Peer]
    prometheus_url: str
    config_path: Path
    relay: Relay

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
    from swarm.corpus import generate, write_jsonl

    workdir = tmp_path_factory.mktemp("monitoring")
    base = make_base(workdir / "base", layers=2, hidden=32, pretrain_steps=0, progress=False, use_cache=False)
    train = write_jsonl(generate("finetune", 200, seed=1), workdir / "data" / "train.jsonl")
    spec = RoundSpec(
        round_id="mon-1", base=BaseModelRef(path=str(base), num_layers=2), spans=split_even(2, 2),
        data=DataSettings(train_path=str(train), seq_len=32, micro_batch_size=4),
        optimizer=OptimizerSettings(target_batch_size=16, matchmaking_time=1.0, averaging_timeout=5.0),
        end=EndCondition(target_samples=10**8, target_epochs=10**6, deadline_s=3600),
    )  # fmt: skip
    spec_path = workdir / "round.json"
    spec.save(spec_path)
    coordinator = serve(CoordinatorConfig(
        host="127.0.0.1", port=0, metrics_port=0, workdir=workdir, store="memory", round_spec=spec, join_token=TOKEN,
        heartbeat_interval_s=1.0, heartbeat_timeout_s=60.0,
    ))  # fmt: skip
    peers = [Peer(n, workdir / f"{n}.key", _new_identity(workdir / f"{n}.key")) for n in ("peer-a", "peer-b", "peer-c")]
    channel = grpc.insecure_channel(coordinator.address)
    stub = pb_grpc.CoordinatorStub(channel)
    relay: Relay | None = None
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        with pytest.raises(grpc.RpcError):  # a refused join, so the rejections panel has a series
            stub.Join(pb.JoinRequest(peer_id="intruder", software_version=__version__, join_token="wrong"), timeout=10)
        initial_peers: list[str] = []
        spans: list[pb.Span] = []
        for peer in peers:
            reply = stub.Join(pb.JoinRequest(
                peer_id=peer.peer_id, multiaddrs=["/ip4/127.0.0.1/tcp/1"], software_version=__version__,
                join_token=TOKEN, capacity=pb.Capacity(device="cpu"),
            ), timeout=10)  # fmt: skip
            assert reply.accepted, reply.reject_reason
            peer.span_index = [s.name for s in spec.spans].index(f"{reply.span.start}-{reply.span.end}")
            initial_peers = list(reply.dht_initial_peers)
        spans = [pb.Span(start=s.start, end=s.end) for s in spec.spans]
        replicas = [sum(p.span_index == i for p in peers) for i in range(len(spans))]
        assert sorted(replicas) == [1, 2], f"expected one span with two replicas, got {replicas}"
        # the trainer hosts the span with one replica; the pair on the other span all-reduce
        single = replicas.index(1)
        next(p for p in peers if p.span_index == single).trainer = True
        assert initial_peers, "the coordinator's Join answer names no DHT initial peers"
        relay = Relay(stub, spec.round_id, peers, spans)
        relay.start()
        for peer in peers:
            _start_peer(peer, workdir, spec_path, initial_peers, train)

        def ready() -> bool:
            for peer in peers:
                assert peer.proc is not None and peer.proc.poll() is None, f"{peer.name} exited:\n{peer.log_tail()}"
                ready_events = [e for e in peer.read_events() if e["event"] == "ready"]
                if ready_events:
                    peer.metrics_port = int(ready_events[0]["metrics_port"])
            return all(p.metrics_port for p in peers)

        _poll(ready, 60, "the peers' ready events")
        config = render_prometheus_config(workdir / "prometheus", f"127.0.0.1:{coordinator.metrics_port}",
                                          [f"127.0.0.1:{p.metrics_port}" for p in peers])  # fmt: skip
        prometheus, url = _start_prometheus(config, workdir)
        yield Swarm(coordinator, peers, url, config, relay)
    finally:
        if relay is not None:
            relay.stop_event.set()
            relay.join(5)
        _stop_processes([*(p.proc for p in peers), prometheus], grace_s=3.0)
        channel.close()
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
               "SwarmCoordinatorDown"}  # fmt: skip
    wrong = [(a["labels"]["alertname"], a["labels"]) for a in active if a["labels"]["alertname"] in healthy]
    assert not wrong, f"alerts on a healthy swarm: {wrong}"
    # a peer that stops heartbeating shows up in SwarmPeerMissingHeartbeats' expression within seconds
    silent = swarm.peers[0]
    missing = next(r["expr"] for r in rules if r["alert"] == "SwarmPeerMissingHeartbeats")
    swarm.relay.paused.add(silent.peer_id)
    try:
        ages = "swarm_coordinator_member_heartbeat_age_seconds"
        _poll(lambda: any(r["metric"].get("peer") == silent.peer_id for r in swarm.query(missing)["data"]["result"]),
              20, f"SwarmPeerMissingHeartbeats to name {silent.name}", detail=lambda: swarm.query(ages))  # fmt: skip
    finally:
        swarm.relay.paused.discard(silent.peer_id)


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
    assert swarm.relay.beats > 0 and not swarm.relay.errors, swarm.relay.errors
