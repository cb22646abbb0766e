"""A real coordinator on 127.0.0.1: a round driven over gRPC to a published, signed adapter and the next round;
the signed roster in the DHT; SIGKILL and restart keep the registry and the contributions."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from safetensors.torch import save
from typer.testing import CliRunner

from coordinator.server import CoordinatorConfig, CoordinatorServer, serve
from coordinator.store_sqlite import SqliteStore
from swarm.adapter_client import list_adapters, pull_adapter
from swarm.config import BaseModelRef, EndCondition, RoundSpec, split_even
from swarm.keys import load_public_key
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc
from tests.identities import GrpcPeers, coordinator_channel, pid
from tests.unit.finalize_helpers import LORA, span_state

T = TypeVar("T")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
RPC = 10.0
PEERS = ("peerA", "peerB")


@pytest.fixture
def spec(tiny_checkpoint: Callable[..., Path]) -> RoundSpec:
    from swarm.checkpoint import fingerprint

    base = tiny_checkpoint("llama", layers=2)
    return RoundSpec(round_id="r1", base=BaseModelRef(path=str(base), fingerprint=fingerprint(base), num_layers=2),
                     lora=LORA, spans=split_even(2, 2), end=EndCondition(target_samples=10))  # fmt: skip


def poll(condition: Callable[[], T], deadline_s: float, what: str) -> T:
    deadline = time.monotonic() + deadline_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {deadline_s} s waiting for {what}"
        time.sleep(0.05)
    return value


def join(peers: GrpcPeers, spec: RoundSpec, peer: str) -> pb.JoinResponse:
    reply = peers.join(peer, multiaddrs=["/ip4/127.0.0.1/tcp/4000"], software_version="0.1.0",
                       base_fingerprint=spec.base.fingerprint)  # fmt: skip
    assert reply.accepted, reply.reject_reason
    return reply


def drive_round(stub: pb_grpc.CoordinatorStub, spec: RoundSpec) -> GrpcPeers:
    """What two peers do: join, report the starting eval, train until told to finalize, upload, and evaluate
    the candidate the coordinator names (each is one of its picked evaluators)."""
    peers = GrpcPeers(stub, RPC)
    spans = {p: join(peers, spec, p).span for p in PEERS}

    def report(p: str, epoch: int, loss: float, candidate: str = "") -> None:
        stub.ReportEval(pb.ReportEvalRequest(peer_id=pid(p), round_id="r1", epoch=epoch, eval_loss=loss,
                                             eval_tokens=640, credential=peers.credential(p),
                                             candidate_sha256=candidate), timeout=RPC)  # fmt: skip

    for p in PEERS:
        report(p, 0, 3.0)
    time.sleep(0.01)  # counters grow at most max_samples_per_s since the Join

    def told_to_finalize() -> bool:
        progress = dict(samples=5, tokens=320, epoch=2, loss=2.5, throughput=4.0)
        return all([peers.heartbeat(p, **progress).action == "finalize" for p in PEERS])

    poll(told_to_finalize, 20, "the heartbeat to answer finalize")
    for p, span in spans.items():
        blob = save(span_state(span.start))
        stub.UploadSpanState(pb.UploadSpanStateRequest(peer_id=pid(p), round_id="r1", span=span, epoch=2,
                                                       safetensors=blob, samples=5, credential=peers.credential(p)),
                             timeout=RPC)  # fmt: skip
    candidates = {p: poll(lambda p=p: peers.heartbeat(p, samples=5, tokens=320, epoch=2).eval_candidate_sha256, 20,  # type: ignore[misc]
                          "the candidate to evaluate") for p in PEERS}  # fmt: skip
    for p, sha in candidates.items():
        report(p, 2, 2.0, sha)
    return peers


@pytest.fixture
def server(tmp_path: Path, spec: RoundSpec) -> Iterator[CoordinatorServer]:
    s = serve(CoordinatorConfig(host="127.0.0.1", port=0, metrics_port=None, workdir=tmp_path, round_spec=spec,
                                dht=False, rounds=2, finalize_poll_s=0.05, heartbeat_interval_s=0.2))  # fmt: skip
    yield s
    s.stop(grace=0)


def test_round_is_published_pulled_verified_and_continued(
    server: CoordinatorServer, spec: RoundSpec, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    public_key = load_public_key(server.public_key_path)
    assert server.config.signing_key_path.stat().st_mode & 0o777 == 0o600
    with coordinator_channel(server.address, server.tls_cert_path) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        peers = drive_round(stub, spec)
        [entry] = poll(lambda: list_adapters(channel), 20, "adapter v1 in the registry")
        assert (entry.version, list(entry.parents), entry.round_id) == ("v1", [], "r1")
        assert (entry.eval_loss_before, entry.eval_loss_after) == (3.0, 2.0)
        manifest = pull_adapter(channel, "v1", tmp_path / "pulled", public_key)
        assert manifest.base_fingerprint == spec.base.fingerprint and manifest.weights_sha256 == entry.sha256
        assert {(c.peer_id, c.samples) for c in manifest.contributors} == {(pid(p), 5) for p in PEERS}
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spec.base.path), tmp_path / "pulled")
        config: Any = model.peft_config["default"]
        assert config.r == LORA.rank

        nxt = stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=RPC)
        assert (nxt.round_id, nxt.state) == ("r1-r2", "open")
        assert RoundSpec.from_json(nxt.round_spec_json).parent_adapter == "v1"
        done = stub.GetRoundSpec(pb.GetRoundSpecRequest(round_id="r1"), timeout=RPC)
        assert (done.state, done.adapter_version, done.reason) == ("published", "v1", "published v1")
        beat = peers.heartbeat("peerA", samples=5, tokens=320)
        assert (beat.ok, beat.action, beat.next_round_id) == (False, "rejoin", "r1-r2")
        assert join(peers, spec, "peerA").round_id == "r1-r2"

    from swarm.cli import build_app

    runner = CliRunner()
    cert = ["--coordinator-cert", str(server.tls_cert_path)]
    listed = runner.invoke(build_app(), ["adapters", "list", "--coordinator", server.address, *cert])
    assert listed.exit_code == 0 and "v1" in listed.output and "3.0000" in listed.output, listed.output
    out = tmp_path / "cli-pull"
    pulled = runner.invoke(build_app(), ["adapters", "pull", "latest", "-c", server.address, "--out", str(out),
                                         "--public-key", str(server.public_key_path), *cert])  # fmt: skip
    assert pulled.exit_code == 0 and (out / "manifest.sig").is_file(), pulled.output
    runner.invoke(build_app(), ["adapters", "keygen", str(tmp_path / "other")])
    refused = runner.invoke(build_app(), ["adapters", "pull", "v1", "-c", server.address, "--out", str(tmp_path / "x"),
                                          "--public-key", str(tmp_path / "other.pub"), *cert])  # fmt: skip
    assert refused.exit_code == 1 and "signature invalid" in refused.output
    assert not (tmp_path / "x").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]
    sample = server.ctx.metrics.registry.get_sample_value
    assert sample("swarm_coordinator_finalize_total", {"outcome": "published"}) == 1
    assert sample("swarm_coordinator_adapter_eval_loss", {"version": "v1", "phase": "after"}) == 2.0


def test_roster_is_signed_in_the_dht(tmp_path: Path, spec: RoundSpec) -> None:
    import hivemind

    from peer.announce import record_validators
    from peer.roster_view import roster_records
    from swarm.roster import roster_key, verify_roster

    def found_subkeys(dht: hivemind.DHT) -> list[bytes]:
        found = dht.get(roster_key("r1"), latest=True)
        return list(found.value) if found is not None and isinstance(found.value, dict) else []

    # The reading node starts first: hivemind forks a DHT's process, and forking this test process while the
    # coordinator's RPC and roster threads run has hung the child (CI). It joins the coordinator's DHT below.
    # a reader installs what every peer does: hivemind strips the record signatures the roster's subkey carries
    client = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=record_validators("r1"))
    server = serve(CoordinatorConfig(host="127.0.0.1", port=0, metrics_port=None, workdir=tmp_path, round_spec=spec,
                                     roster_interval_s=0.2,
                                     dht_initial_peers=tuple(str(m) for m in client.get_visible_maddrs())))  # fmt: skip
    try:
        with coordinator_channel(server.address, server.tls_cert_path) as channel:
            reply = join(GrpcPeers(pb_grpc.CoordinatorStub(channel)), spec, "peerA")
        assert reply.dht_initial_peers and all("/p2p/" in m for m in reply.dht_initial_peers)
        key = load_public_key(server.public_key_path)

        def roster_with_peer() -> list[dict[str, Any]] | None:
            found = client.get(roster_key("r1"), latest=True)
            if found is None:  # stored under the coordinator node's own subkey, signed by its Ed25519 key
                return None
            records = [verify_roster(r, key, round_id="r1", max_age_s=30) for r in roster_records(found.value)]
            return [r for r in records if r["peers"]] or None

        rosters = poll(roster_with_peer, 20, "the roster in the DHT")
        assert rosters is not None and len(rosters) == 1
        assert all(k.startswith(b"[owner:") for k in found_subkeys(client))  # the coordinator node's own subkey
        assert [(p["peer_id"], p["span"]) for p in rosters[0]["peers"]] == [(pid("peerA"), [0, 1])]
        published = server.ctx.metrics.registry.get_sample_value(
            "swarm_coordinator_roster_publishes_total", {"result": "ok"}
        )
        assert published is not None and published >= 1
    finally:
        server.stop(grace=0)
        client.shutdown()


def _start(workdir: Path, spec_file: Path, *flags: str) -> tuple[subprocess.Popen[str], str]:
    args = [sys.executable, "-m", "coordinator", "--port", "0", "--metrics-port", "-1", "--workdir", str(workdir),
            "--round-spec", str(spec_file), "--heartbeat-interval", "0.2", *flags]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    while not (lines and lines[-1].startswith("coordinator gRPC listening on ")):
        lines.append(proc.stdout.readline())  # bounded by the test timeout
        assert lines[-1] and len(lines) < 100, "".join(lines)
    return proc, lines[-1].split()[-1]


def descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (Linux /proc)."""
    out = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            out += [child, *descendants(child)]
    return out


def test_sigkill_and_restart_keep_the_adapter_and_contributions(tmp_path: Path, spec: RoundSpec) -> None:
    spec_file = tmp_path / "round.json"
    spec.save(spec_file)
    proc, address = _start(tmp_path, spec_file)  # with its DHT node (a process, and p2pd under it)
    orphans = descendants(proc.pid)
    try:
        assert orphans, "the coordinator should run its DHT node in child processes"
        cert = tmp_path / "coordinator" / "tls_cert.pem"
        with coordinator_channel(address, cert) as channel:
            drive_round(pb_grpc.CoordinatorStub(channel), spec)
            [before] = poll(lambda: list_adapters(channel), 20, "adapter v1")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        poll(lambda: not any(Path(f"/proc/{p}").exists() for p in orphans), 10, "the DHT processes to exit")
        proc, address = _start(tmp_path, spec_file, "--no-dht")
        with coordinator_channel(address, cert) as channel:
            assert list_adapters(channel) == [before]
            stub = pb_grpc.CoordinatorStub(channel)
            assert stub.GetRoundSpec(pb.GetRoundSpecRequest(round_id="r1"), timeout=RPC).state == "published"
            key = load_public_key(tmp_path / "coordinator" / "public_key.pem")
            assert pull_adapter(channel, "v1", tmp_path / "pulled", key).version == "v1"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for orphan in orphans:  # only if the test failed: never leave our DHT processes behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(orphan, signal.SIGKILL)
    store = SqliteStore(tmp_path / "coordinator" / "state.sqlite3")
    assert {(c.peer_id, c.samples, c.tokens) for c in store.list_contributions("r1")} == {
        (pid(p), 5, 320) for p in PEERS
    }
    store.close()
