"""Thin gRPC servicer: parse the request, apply per-method limits, time the handler, map errors to a status.

Requests arrive as raw bytes (no deserializer is registered) so that the servicer, not grpc, parses
them: a garbage body gets ``INVALID_ARGUMENT`` and one log line at most, never ``INTERNAL`` with a
traceback per call. Each method has its own size cap (only ``UploadSpanState`` may be large) and every
call spends a token of its caller's rate-limit buckets (its address, and the peer id it names).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from coordinator import handlers, handlers_data, reachability
from coordinator.context import CoordinatorContext
from coordinator.validation import HandlerError
from swarm.proto import SERVICE_NAME
from swarm.proto import coordinator_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str
    request: type[Message]
    handler: Callable[..., Any]  # (ctx, request), or (ctx, request, caller address) when ``caller``
    large: bool = False  # may use the whole max_message_mb (UploadSpanState)
    stream: bool = False  # server-streaming response
    caller: bool = False  # the handler also gets the caller's address (grpc context.peer())


METHODS = (
    Method("Join", pb.JoinRequest, handlers.join),
    Method("Heartbeat", pb.HeartbeatRequest, handlers.heartbeat),
    Method("Leave", pb.LeaveRequest, handlers.leave),
    Method("GetRoundSpec", pb.GetRoundSpecRequest, handlers.get_round_spec),
    Method("ListAdapters", pb.ListAdaptersRequest, handlers_data.list_adapters),
    Method("DownloadAdapter", pb.DownloadAdapterRequest, handlers_data.download_adapter, stream=True),
    Method("UploadSpanState", pb.UploadSpanStateRequest, handlers_data.upload_span_state, large=True),
    Method("ReportEval", pb.ReportEvalRequest, handlers_data.report_eval),
    Method("CheckReachability", pb.CheckReachabilityRequest, reachability.check_reachability, caller=True),
)


def _caller(context: Any) -> str:
    """The caller's address without its port (``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``)."""
    peer = str(context.peer() or "unknown")
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class CoordinatorServicer:
    """Serves :data:`METHODS` over one :class:`CoordinatorContext`; register with :meth:`generic_handler`."""

    def __init__(self, ctx: CoordinatorContext) -> None:
        self.ctx = ctx
        self.methods = {m.name: m for m in METHODS}

    def call(self, name: str, raw: bytes, context: Any) -> Any:
        """Serve one call of method ``name`` from its raw request bytes (what grpc hands over)."""
        method = self.methods[name]
        return self._streaming(method)(raw, context) if method.stream else self._call(method, raw, context)

    def _parse(self, method: Method, raw: bytes, context: Any) -> Any:
        limit = self.ctx.config.max_message_bytes if method.large else self.ctx.config.max_small_message_kb * 1024
        if len(raw) > limit:
            raise HandlerError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{method.name} request of {len(raw)} bytes is over its limit of {limit} bytes")  # fmt: skip
        try:
            request = method.request.FromString(raw)
        except (DecodeError, ValueError, RuntimeError) as e:
            raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{method.name} request is not a valid {method.request.DESCRIPTOR.full_name}: "
                               f"{type(e).__name__}") from None  # fmt: skip
        # Every call spends from its address's bucket (a peer id in a request is a claim until checked, so
        # it cannot buy a fresh budget); a call naming a peer id also spends from that peer's bucket.
        peer_id = getattr(request, "peer_id", "")
        keys = [_caller(context), *([f"peer:{peer_id}"] if peer_id else [])]
        if not all([self.ctx.rate.allow(key) for key in keys]):
            raise HandlerError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{method.name}: too many calls; slow down")
        return request

    def _call(self, method: Method, raw: bytes, context: Any) -> Any:
        metrics = self.ctx.metrics
        start = time.perf_counter()
        try:
            request = self._parse(method, raw, context)
            if method.caller:
                return method.handler(self.ctx, request, str(context.peer() or ""))
            return method.handler(self.ctx, request)
        except HandlerError as e:
            code, message = e.code, e.message
        except Exception as e:  # a bug: say so to the caller, keep serving
            log.exception("%s failed", method.name)
            code, message = (
                grpc.StatusCode.INTERNAL,
                f"{method.name} failed inside the coordinator: {type(e).__name__}: {e}",
            )
        finally:
            metrics.rpc_duration.labels(method=method.name).observe(time.perf_counter() - start)
        metrics.rpc_errors.labels(method=method.name, code=code.name).inc()
        context.abort(code, message)
        raise AssertionError("grpc context.abort returned")  # abort always raises

    def _unary(self, method: Method) -> Callable[[bytes, Any], Any]:
        return lambda raw, context: self._call(method, raw, context)

    def _streaming(self, method: Method) -> Callable[[bytes, Any], Iterator[Any]]:
        def serve(raw: bytes, context: Any) -> Iterator[Any]:
            # Errors found before the first chunk get their status; a read error mid-stream ends it with UNKNOWN.
            yield from self._call(method, raw, context)

        return serve

    def generic_handler(self) -> grpc.GenericRpcHandler:
        table = {}
        for m in METHODS:
            if m.stream:
                table[m.name] = grpc.unary_stream_rpc_method_handler(
                    self._streaming(m), response_serializer=pb.AdapterChunk.SerializeToString
                )
            else:
                table[m.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(m), response_serializer=lambda msg: msg.SerializeToString()
                )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, table)
