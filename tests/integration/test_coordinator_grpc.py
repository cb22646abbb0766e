"""A real coordinator on 127.0.0.1 (port 0): gRPC round trips, health, status codes, timeouts, the CLI."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.server import CoordinatorConfig, CoordinatorServer, serve
from coordinator.state import AdapterRecord, MemberState
from swarm.config import BaseModelRef, EndCondition, RoundSpec, split_even
from swarm.proto import SERVICE_NAME
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc
from tests.identities import GrpcPeers, coordinator_channel, pid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SPEC = RoundSpec(
    round_id="r1",
    base=BaseModelRef(path="/models/tiny", fingerprint="fp1", num_layers=4),
    spans=split_even(4, 2),
    end=EndCondition(target_samples=10_000),
)
RPC_TIMEOUT = 10.0


def start(tmp_path: Path, **kw: object) -> CoordinatorServer:
    fields: dict = dict(host="127.0.0.1", port=0, metrics_port=0, workdir=tmp_path, round_spec=SPEC,
                        join_token="tok", max_message_mb=1, download_chunk_bytes=64 << 10, dht=False)  # fmt: skip
    fields.update(kw)
    return serve(CoordinatorConfig(**fields))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoordinatorServer]:
    s = start(tmp_path)
    yield s
    s.stop(grace=0)


@pytest.fixture
def stub(server: CoordinatorServer) -> Iterator[pb_grpc.CoordinatorStub]:
    with coordinator_channel(server.address, server.tls_cert_path) as channel:  # TLS, pinned
        yield pb_grpc.CoordinatorStub(channel)


PEERS: dict[int, GrpcPeers] = {}  # id(stub) -> its peers


def peers(stub: pb_grpc.CoordinatorStub) -> GrpcPeers:
    return PEERS.setdefault(
        id(stub),
        GrpcPeers(
            stub,
            RPC_TIMEOUT,
            multiaddrs=["/ip4/127.0.0.1/tcp/4000"],
            base_fingerprint="fp1",
            software_version="0.1.0",
            join_token="tok",
        ),
    )


def join(stub: pb_grpc.CoordinatorStub, peer: str, **kw: object) -> pb.JoinResponse:
    return peers(stub).join(peer, **kw)


def cred(stub: pb_grpc.CoordinatorStub, peer: str) -> str:
    return peers(stub).credential(peer)


def status_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def poll(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {deadline_s} s waiting for {what}"
        time.sleep(0.1)  # a poll sends heartbeats: stay under the per-address rate limit


def test_round_trip_and_health(server: CoordinatorServer, stub: pb_grpc.CoordinatorStub) -> None:
    with coordinator_channel(server.address, server.tls_cert_path) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    a, b = join(stub, "peerA"), join(stub, "peerB")
    assert a.accepted and b.accepted and [(r.span.start, r.span.end) for r in (a, b)] == [(0, 2), (2, 4)]
    assert RoundSpec.from_json(a.round_spec_json) == SPEC
    time.sleep(0.01)  # counters may grow by max_samples_per_s (2000/s) since the Join
    hb = peers(stub).heartbeat("peerA", samples=5, loss=2.0)
    assert (hb.ok, hb.round_state, hb.action) == (True, "training", "continue")
    spec = stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=RPC_TIMEOUT)
    assert (spec.round_id, spec.state, spec.samples) == ("r1", "training", 5)
    assert list(stub.ListAdapters(pb.ListAdaptersRequest(), timeout=RPC_TIMEOUT).adapters) == []
    leave = pb.LeaveRequest(peer_id=pid("peerB"), round_id="r1", credential=cred(stub, "peerB"))
    assert stub.Leave(leave, timeout=RPC_TIMEOUT).ok
    assert server.metrics_url is not None
    metrics = urllib.request.urlopen(server.metrics_url, timeout=RPC_TIMEOUT).read().decode()
    assert 'swarm_coordinator_members{span="2-4",state="left"} 1.0' in metrics
    assert 'swarm_coordinator_rpc_duration_seconds_count{method="Join"} 2.0' in metrics
    health_url = server.metrics_url.replace("/metrics", "/health")
    assert urllib.request.urlopen(health_url, timeout=RPC_TIMEOUT).read() == b"ok\n"


def test_bad_requests_get_status_codes_and_server_keeps_serving(
    server: CoordinatorServer, stub: pb_grpc.CoordinatorStub
) -> None:
    assert join(stub, "good").accepted
    e = status_of(lambda: join(stub, "x", peer_id=""))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "peer_id" in (e.details() or "")
    e = status_of(lambda: peers(stub).heartbeat("good", samples=-1))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "progress.samples" in (e.details() or "")
    big = pb.UploadSpanStateRequest(peer_id=pid("good"), round_id="r1", span=pb.Span(start=0, end=2),
                                    safetensors=b"\0" * (2 << 20), credential=cred(stub, "good"))  # fmt: skip
    e = status_of(lambda: stub.UploadSpanState(big, timeout=RPC_TIMEOUT))
    assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    e = status_of(lambda: join(stub, "x", round_id="r404"))
    assert e.code() is grpc.StatusCode.NOT_FOUND and "r404" in (e.details() or "")
    e = status_of(lambda: join(stub, "x", join_token="nope"))
    assert e.code() is grpc.StatusCode.PERMISSION_DENIED
    wrong = join(stub, "x", base_fingerprint="fp2")
    assert not wrong.accepted and "load the base model /models/tiny" in wrong.reject_reason
    # still serving, nothing lost
    assert stub.GetRoundSpec(pb.GetRoundSpecRequest(round_id="r1"), timeout=RPC_TIMEOUT).round_id == "r1"
    assert [m.peer_id for m in server.ctx.store.list_members("r1")] == [pid("good")]
    sample = server.ctx.metrics.registry.get_sample_value
    assert sample("swarm_coordinator_join_rejections_total", {"reason": "fingerprint"}) == 1
    assert sample("swarm_coordinator_rpc_errors_total", {"method": "Join", "code": "NOT_FOUND"}) == 1


def test_port_in_use_is_a_clear_error(server: CoordinatorServer, tmp_path: Path) -> None:
    with pytest.raises(OSError, match=f"cannot listen for gRPC on 127.0.0.1:{server.port}"):
        start(tmp_path / "second", port=server.port, store="memory")


def test_heartbeat_timeout_drops_member_and_rebalances(tmp_path: Path) -> None:
    server = start(tmp_path, heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0)
    try:
        with coordinator_channel(server.address, server.tls_cert_path) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            spans = {p: join(stub, p).span.start for p in ("a", "b", "c")}
            assert spans == {"a": 0, "b": 2, "c": 0}

            def b_is_dead() -> bool:  # a and c keep heartbeating, b is silent
                for p in ("a", "c"):
                    peers(stub).heartbeat(p)
                member = server.ctx.store.get_member("r1", pid("b"))
                return member is not None and member.state is MemberState.DEAD

            poll(b_is_dead, 15.0, "silent peer b to be marked dead")
            moved = peers(stub).heartbeat("c")  # a and c tie on throughput; c's peer id sorts first and moves
            assert moved.ok and (moved.span.start, moved.span.end) == (2, 4)
            gone = peers(stub).heartbeat("b")
            assert not gone.ok and gone.action == "rejoin"
    finally:
        server.stop(grace=0)


def test_sweep_thread_expires_members_without_any_request(tmp_path: Path) -> None:
    server = start(tmp_path, heartbeat_interval_s=0.05, heartbeat_timeout_s=0.3)
    try:
        with coordinator_channel(server.address, server.tls_cert_path) as channel:
            join(pb_grpc.CoordinatorStub(channel), "a")

        def a_is_dead() -> bool:  # reads the store directly: no RPC triggers the lazy expiry
            member = server.ctx.store.get_member("r1", pid("a"))
            return member is not None and member.state is MemberState.DEAD

        poll(a_is_dead, 10.0, "the sweep thread to mark peer a dead")
    finally:
        server.stop(grace=0)


def test_upload_and_download(server: CoordinatorServer, stub: pb_grpc.CoordinatorStub, tmp_path: Path) -> None:
    join(stub, "a")
    join(stub, "b")
    time.sleep(0.01)
    peers(stub).heartbeat("a", epoch=1)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + b"\1" * 16
    up = pb.UploadSpanStateRequest(peer_id=pid("a"), round_id="r1", span=pb.Span(start=0, end=2), epoch=1,
                                   safetensors=blob, samples=8, credential=cred(stub, "a"))  # fmt: skip
    assert stub.UploadSpanState(up, timeout=RPC_TIMEOUT).size_bytes == len(blob)
    adapter = tmp_path / "adapter-v1"
    adapter.mkdir()
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": os.urandom(200_000)}
    for name, data in files.items():
        (adapter / name).write_bytes(data)
    server.ctx.store.add_adapter(AdapterRecord("v1", (), "r1", str(adapter), "sha", 1.0))
    got: dict[str, bytes] = {}
    for chunk in stub.DownloadAdapter(pb.DownloadAdapterRequest(version="v1"), timeout=RPC_TIMEOUT):
        got[chunk.file_name] = got.get(chunk.file_name, b"") + chunk.data
    assert got == files
    e = status_of(lambda: list(stub.DownloadAdapter(pb.DownloadAdapterRequest(version="v2"), timeout=RPC_TIMEOUT)))
    assert e.code() is grpc.StatusCode.NOT_FOUND


CLI = "import typer; from coordinator.cli import register; app = typer.Typer(); app.callback()(lambda: None); register(app); app()"


def test_cli_prints_addresses_and_stops_on_sigterm(tmp_path: Path) -> None:
    spec_file = tmp_path / "round.json"
    SPEC.save(spec_file)
    args = [sys.executable, "-c", CLI, "coordinator", "--port", "0", "--metrics-port", "0", "--workdir",
            str(tmp_path), "--round-spec", str(spec_file), "--no-dht"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not (lines and lines[-1].startswith("coordinator gRPC listening on 127.0.0.1:")):
            lines.append(proc.stdout.readline())  # log lines come first; readline is bounded by the test timeout
            assert lines[-1] and len(lines) < 50, "".join(lines)
        address = lines[-1].split()[-1]
        with coordinator_channel(address, tmp_path / "coordinator" / "tls_cert.pem") as channel:
            reply = pb_grpc.CoordinatorStub(channel).GetRoundSpec(pb.GetRoundSpecRequest(), timeout=RPC_TIMEOUT)
            assert reply.round_id == "r1"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out
    assert "coordinator stopped" in out
    assert (tmp_path / "coordinator" / "state.sqlite3").is_file()
