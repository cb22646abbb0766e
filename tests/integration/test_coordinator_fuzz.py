"""Fuzzing a live coordinator on 127.0.0.1: random, truncated and oversized bodies at the gRPC port,
raw junk at its TCP socket, malformed and slow HTTP requests at the status / metrics port. Nothing
crashes, nothing floods the log with tracebacks, and normal requests are still answered within a second."""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from coordinator.server import CoordinatorConfig, CoordinatorServer, serve
from swarm.config import BaseModelRef, EndCondition, RoundSpec, split_even
from swarm.proto import SERVICE_NAME
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc
from tests.identities import coordinator_channel

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
SPEC = RoundSpec(round_id="r1", base=BaseModelRef(path="/m", fingerprint="fp", num_layers=4), spans=split_even(4, 2),
                 end=EndCondition(target_samples=1000))  # fmt: skip
METHODS = (
    "Join",
    "Heartbeat",
    "Leave",
    "GetRoundSpec",
    "ListAdapters",
    "UploadSpanState",
    "ReportEval",
    "CheckReachability",
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoordinatorServer]:
    s = serve(CoordinatorConfig(host="127.0.0.1", port=0, metrics_port=0, workdir=tmp_path, round_spec=SPEC,
                                dht=False, max_message_mb=4, rate_limit_per_s=0, http_timeout_s=2))  # fmt: skip
    yield s
    s.stop(grace=0)


def answered_within_a_second(server: CoordinatorServer, stub: pb_grpc.CoordinatorStub) -> None:
    start = time.monotonic()
    assert stub.GetRoundSpec(pb.GetRoundSpecRequest(), timeout=1.0).round_id == "r1"
    assert server.metrics_url is not None
    assert b"swarm_coordinator_rounds" in urllib.request.urlopen(server.metrics_url, timeout=1.0).read()
    status = server.metrics_url.replace("/metrics", "/api/status")
    assert b'"round_id": "r1"' in urllib.request.urlopen(status, timeout=1.0).read()
    assert time.monotonic() - start < 1.0


def test_grpc_garbage_is_refused_cleanly(server: CoordinatorServer, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(0)
    valid = pb.JoinRequest(peer_id="p" * 100, multiaddrs=["/ip4/1.2.3.4/tcp/1"] * 3).SerializeToString()
    bodies = [rng.randbytes(rng.randint(1, 2000)) for _ in range(60)]
    bodies += [valid[:n] for n in range(1, len(valid), 7)]  # truncated
    codes: dict[str, int] = {}
    with caplog.at_level(logging.INFO), coordinator_channel(server.address, server.tls_cert_path) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for i, body in enumerate(bodies):
            method = METHODS[i % len(METHODS)]
            call = channel.unary_unary(f"/{SERVICE_NAME}/{method}", request_serializer=None,
                                       response_deserializer=None)  # fmt: skip
            try:
                call(body, timeout=5)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.RpcError as e:
                assert e.code() is not grpc.StatusCode.INTERNAL, (method, body[:40], e.details())
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
        for size in (128 << 10, 5 << 20):  # over the small-call cap, over the whole-message cap
            with pytest.raises(grpc.RpcError) as info:
                stub.Heartbeat(pb.HeartbeatRequest(peer_id="x", round_id="y" * size), timeout=10)
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        rss = psutil.Process().memory_info().rss
        upload = channel.unary_unary(f"/{SERVICE_NAME}/UploadSpanState", request_serializer=None,
                                     response_deserializer=None)  # fmt: skip
        for _ in range(30):  # 30 x 3.5 MiB of junk uploads, each refused after it was received
            with pytest.raises(grpc.RpcError):
                upload(pb.UploadSpanStateRequest(peer_id="x", safetensors=rng.randbytes(7 << 19)).SerializeToString(),
                       timeout=10)  # fmt: skip
        grown = (psutil.Process().memory_info().rss - rss) / (1 << 20)
        assert grown < 100, f"memory grew by {grown:.0f} MiB over 105 MiB of refused uploads"
        answered_within_a_second(server, stub)
    assert codes.get("INVALID_ARGUMENT", 0) > 20, codes
    assert not [r for r in caplog.records if r.exc_info], "a traceback per bad call would let junk flood the log"
    assert server.ctx.store.list_members("r1") == []


def test_raw_junk_at_the_grpc_socket(server: CoordinatorServer) -> None:
    rng = random.Random(1)
    for payload in (b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(500),
                    rng.randbytes(4096), b"\x16\x03\x01" + rng.randbytes(300)):  # fmt: skip
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(payload)
            s.settimeout(2)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                s.recv(1024)
    with coordinator_channel(server.address, server.tls_cert_path) as channel:
        answered_within_a_second(server, pb_grpc.CoordinatorStub(channel))


def _http_exchange(port: int, payload: bytes) -> bytes:
    """What the server answers before it closes (it may close early, even mid-send, on an oversized request)."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(payload)
            with contextlib.suppress(OSError):  # ENOTCONN: the server already closed (an answer may still be read)
                s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(4096):
                out += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return out


def test_http_malformed_and_slow_requests(server: CoordinatorServer) -> None:
    port = server.metrics_port
    assert port is not None
    for payload in (b"GARBAGE\r\n\r\n", b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):  # fmt: skip
        status_line = _http_exchange(port, payload).split(b"\r\n")[0]
        assert status_line.startswith(b"HTTP/1.") and b" 400 " in status_line, status_line
    for payload in (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n"):  # fmt: skip
        status_line = _http_exchange(port, payload).split(b"\r\n")[0]  # refused with 4xx, or dropped
        assert status_line == b"" or status_line.startswith(b"HTTP/1.") and b" 4" in status_line, status_line
    assert b" 405 " in _http_exchange(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")[:20]
    slow = []
    for _ in range(40):  # slowloris: connections that never finish their request
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    try:
        with coordinator_channel(server.address, server.tls_cert_path) as channel:
            answered_within_a_second(server, pb_grpc.CoordinatorStub(channel))
        # http_timeout_s=2: the server closes idle connections (waitress checks every second, from a loop that
        # wakes at least every second: closed 2-4 s after the last byte)
        still_open, deadline = list(slow), time.monotonic() + 10
        while still_open and time.monotonic() < deadline:
            readable, _, _ = select.select(still_open, [], [], 0.5)
            still_open = [s for s in still_open if not (s in readable and _closed(s))]
        assert not still_open, f"{len(still_open)} of {len(slow)} idle connections still open 10 s later"
    finally:
        for s in slow:
            s.close()


def _closed(s: socket.socket) -> bool:
    s.settimeout(1)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
