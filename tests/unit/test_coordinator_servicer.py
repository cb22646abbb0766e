"""The thin servicer: handler errors become gRPC statuses, bugs become INTERNAL, every call is timed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest

from coordinator import handlers
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

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        self.code, self.details = code, details
        raise Aborted(details)


@pytest.fixture
def servicer(tmp_path: Path) -> Iterator[CoordinatorServicer]:
    ctx = CoordinatorContext.from_config(CoordinatorConfig(workdir=tmp_path, store="memory"))
    yield CoordinatorServicer(ctx)


def sample(servicer: CoordinatorServicer, name: str, labels: dict[str, str]) -> Any:
    return servicer.ctx.metrics.registry.get_sample_value(name, labels)


def test_handler_error_becomes_status(servicer: CoordinatorServicer) -> None:
    context = FakeContext()
    with pytest.raises(Aborted):
        servicer.Join(pb.JoinRequest(peer_id=""), context)
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT and context.details.startswith("peer_id")
    assert sample(servicer, "swarm_coordinator_rpc_errors_total", {"method": "Join", "code": "INVALID_ARGUMENT"}) == 1
    assert sample(servicer, "swarm_coordinator_rpc_duration_seconds_count", {"method": "Join"}) == 1


def test_unexpected_exception_is_internal(servicer: CoordinatorServicer, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(ctx: CoordinatorContext, req: pb.LeaveRequest) -> pb.LeaveResponse:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(handlers, "leave", boom)
    context = FakeContext()
    with pytest.raises(Aborted):
        servicer.Leave(pb.LeaveRequest(peer_id="a"), context)
    assert context.code is grpc.StatusCode.INTERNAL and "RuntimeError: disk on fire" in context.details


def test_stream_errors_before_first_chunk(servicer: CoordinatorServicer) -> None:
    context = FakeContext()
    with pytest.raises(Aborted):
        list(servicer.DownloadAdapter(pb.DownloadAdapterRequest(version="v1"), context))
    assert context.code is grpc.StatusCode.NOT_FOUND and "'v1'" in context.details


def test_success_returns_the_handler_reply(servicer: CoordinatorServicer) -> None:
    reply = servicer.ListAdapters(pb.ListAdaptersRequest(), FakeContext())
    assert isinstance(reply, pb.ListAdaptersResponse) and list(reply.adapters) == []
