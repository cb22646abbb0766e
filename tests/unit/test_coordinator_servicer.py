"""The thin servicer: it parses raw bytes itself (garbage is INVALID_ARGUMENT), caps sizes per method, limits
the call rate per identity, turns handler errors into statuses and bugs into INTERNAL, and times every call."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.context import CoordinatorContext
from coordinator.servicer import CoordinatorServicer
from swarm.proto import coordinator_pb2 as pb

pytestmark = pytest.mark.timeout(30)


class Aborted(Exception):
    pass


class FakeContext:
    """Stands in for grpc.ServicerContext: ``abort`` raises, as the real one does."""

    code: grpc.StatusCode | None = None
    details = ""

    def __init__(self, peer: str = "ipv4:127.0.0.1:5555") -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        self.code, self.details = code, details
        raise Aborted(details)


@pytest.fixture
def servicer(tmp_path: Path) -> Iterator[CoordinatorServicer]:
    config = CoordinatorConfig(workdir=tmp_path, store="memory", rate_limit_per_s=1.0, rate_limit_burst=5)
    yield CoordinatorServicer(CoordinatorContext.from_config(config))


def sample(servicer: CoordinatorServicer, name: str, labels: dict[str, str]) -> Any:
    return servicer.ctx.metrics.registry.get_sample_value(name, labels)


def aborted(servicer: CoordinatorServicer, name: str, raw: bytes, context: FakeContext | None = None) -> FakeContext:
    context = context or FakeContext()
    with pytest.raises(Aborted):
        reply = servicer.call(name, raw, context)
        list(reply) if name == "DownloadAdapter" else None
    return context


def test_handler_error_becomes_status(servicer: CoordinatorServicer) -> None:
    context = aborted(servicer, "Join", pb.JoinRequest(peer_id="").SerializeToString())
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT and context.details.startswith("peer_id")
    assert sample(servicer, "swarm_coordinator_rpc_errors_total", {"method": "Join", "code": "INVALID_ARGUMENT"}) == 1
    assert sample(servicer, "swarm_coordinator_rpc_duration_seconds_count", {"method": "Join"}) == 1


def test_garbage_bytes_are_invalid_argument_without_a_traceback(
    servicer: CoordinatorServicer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        for raw in (b"\xff\xff\xff\xff", b"\x0a\x80", b"\x12\x05ab", bytes(range(256))):
            context = aborted(servicer, "Heartbeat", raw, FakeContext(f"ipv4:10.0.0.{raw[0]}:1"))
            assert context.code is grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid loraswarm.v1.HeartbeatRequest" in context.details
    assert not [r for r in caplog.records if r.exc_info]


def test_small_methods_have_a_small_size_cap(servicer: CoordinatorServicer) -> None:
    big = pb.JoinRequest(peer_id="a", base_fingerprint="x" * (65 * 1024)).SerializeToString()
    context = aborted(servicer, "Join", big)
    assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "over its limit of 65536 bytes" in context.details
    upload = pb.UploadSpanStateRequest(peer_id="a", safetensors=b"\0" * (65 * 1024)).SerializeToString()
    assert aborted(servicer, "UploadSpanState", upload).code is not grpc.StatusCode.RESOURCE_EXHAUSTED


def test_calls_are_rate_limited_per_identity(servicer: CoordinatorServicer) -> None:
    raw = pb.ListAdaptersRequest().SerializeToString()
    for _ in range(5):  # the burst
        servicer.call("ListAdapters", raw, FakeContext())
    context = aborted(servicer, "ListAdapters", raw)
    assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "too many calls" in context.details
    servicer.call("ListAdapters", raw, FakeContext("ipv4:127.0.0.2:1"))  # another caller has its own budget
    beat = pb.HeartbeatRequest(peer_id="some-peer").SerializeToString()
    assert (
        aborted(servicer, "Heartbeat", beat).code is grpc.StatusCode.RESOURCE_EXHAUSTED
    )  # a new peer id: no new budget
    for _ in range(4):  # one peer id spends its own budget too, whatever address it calls from
        aborted(servicer, "Heartbeat", beat, FakeContext("ipv4:10.9.9.9:1"))
    assert (
        aborted(servicer, "Heartbeat", beat, FakeContext("ipv4:10.8.8.8:1")).code is grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_unexpected_exception_is_internal(servicer: CoordinatorServicer) -> None:
    def boom(ctx: CoordinatorContext, req: pb.LeaveRequest) -> pb.LeaveResponse:
        raise RuntimeError("disk on fire")

    servicer.methods["Leave"] = dataclasses.replace(servicer.methods["Leave"], handler=boom)
    context = aborted(servicer, "Leave", pb.LeaveRequest(peer_id="a").SerializeToString())
    assert context.code is grpc.StatusCode.INTERNAL and "RuntimeError: disk on fire" in context.details


def test_stream_errors_before_first_chunk(servicer: CoordinatorServicer) -> None:
    context = aborted(servicer, "DownloadAdapter", pb.DownloadAdapterRequest(version="v1").SerializeToString())
    assert context.code is grpc.StatusCode.NOT_FOUND and "'v1'" in context.details


def test_success_returns_the_handler_reply(servicer: CoordinatorServicer) -> None:
    reply = servicer.call("ListAdapters", pb.ListAdaptersRequest().SerializeToString(), FakeContext())
    assert isinstance(reply, pb.ListAdaptersResponse) and list(reply.adapters) == []
