"""Thin gRPC servicer: time the call, run the plain handler, turn its errors into a status."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from coordinator import handlers, handlers_data
from coordinator.context import CoordinatorContext
from coordinator.validation import HandlerError
from swarm.proto import coordinator_pb2 as pb
from swarm.proto import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
R = TypeVar("R")


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, ctx: CoordinatorContext) -> None:
        self.ctx = ctx

    def _call(self, method: str, fn: Callable[[CoordinatorContext, Any], R], request: Any, context: Any) -> R:
        metrics = self.ctx.metrics
        start = time.perf_counter()
        try:
            return fn(self.ctx, request)
        except HandlerError as e:
            code, message = e.code, e.message
        except Exception as e:  # a bug: say so to the caller, keep serving
            log.exception("%s failed", method)
            code, message = grpc.StatusCode.INTERNAL, f"{method} failed inside the coordinator: {type(e).__name__}: {e}"
        finally:
            metrics.rpc_duration.labels(method=method).observe(time.perf_counter() - start)
        metrics.rpc_errors.labels(method=method, code=code.name).inc()
        context.abort(code, message)
        raise AssertionError("grpc context.abort returned")  # abort always raises

    def Join(self, request: pb.JoinRequest, context: Any) -> pb.JoinResponse:
        return self._call("Join", handlers.join, request, context)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        return self._call("Heartbeat", handlers.heartbeat, request, context)

    def Leave(self, request: pb.LeaveRequest, context: Any) -> pb.LeaveResponse:
        return self._call("Leave", handlers.leave, request, context)

    def GetRoundSpec(self, request: pb.GetRoundSpecRequest, context: Any) -> pb.GetRoundSpecResponse:
        return self._call("GetRoundSpec", handlers.get_round_spec, request, context)

    def ListAdapters(self, request: pb.ListAdaptersRequest, context: Any) -> pb.ListAdaptersResponse:
        return self._call("ListAdapters", handlers_data.list_adapters, request, context)

    def DownloadAdapter(self, request: pb.DownloadAdapterRequest, context: Any) -> Iterator[pb.AdapterChunk]:
        # Errors found before the first chunk get their status; a read error mid-stream ends it with UNKNOWN.
        yield from self._call("DownloadAdapter", handlers_data.download_adapter, request, context)

    def UploadSpanState(self, request: pb.UploadSpanStateRequest, context: Any) -> pb.UploadSpanStateResponse:
        return self._call("UploadSpanState", handlers_data.upload_span_state, request, context)

    def ReportEval(self, request: pb.ReportEvalRequest, context: Any) -> pb.ReportEvalResponse:
        return self._call("ReportEval", handlers_data.report_eval, request, context)
