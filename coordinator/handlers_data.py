"""Data RPCs as plain functions: adapters out (list, download), span states and eval reports in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc

from coordinator.blobs import adapter_files, read_chunks, span_state_relpath, write_atomic
from coordinator.context import CoordinatorContext
from coordinator.handlers import resolve_round
from coordinator.state import AdapterRecord, EvalReport, RoundRecord, SpanStateUpload
from coordinator.validation import HandlerError, check_count, check_name, check_real, check_safetensors, span_index
from swarm.proto import RoundState
from swarm.proto import coordinator_pb2 as pb


def _entry(a: AdapterRecord) -> pb.AdapterEntry:
    return pb.AdapterEntry(
        version=a.version,
        parents=list(a.parents),
        round_id=a.round_id,
        created_at=a.created_at,
        eval_loss_before=a.eval_loss_before,
        eval_loss_after=a.eval_loss_after,
        sha256=a.sha256,
    )


def list_adapters(ctx: CoordinatorContext, req: pb.ListAdaptersRequest) -> pb.ListAdaptersResponse:
    return pb.ListAdaptersResponse(adapters=[_entry(a) for a in ctx.store.list_adapters()])


def download_adapter(ctx: CoordinatorContext, req: pb.DownloadAdapterRequest) -> Iterator[pb.AdapterChunk]:
    """Check the request now (errors before the first chunk), then stream every file of the directory."""
    if req.version:
        adapter = ctx.store.get_adapter(req.version)
        if adapter is None:
            raise HandlerError(grpc.StatusCode.NOT_FOUND, f"adapter version {req.version[:128]!r} does not exist")
    else:
        adapters = ctx.store.list_adapters()
        if not adapters:
            raise HandlerError(grpc.StatusCode.NOT_FOUND, "no adapter has been published yet")
        adapter = adapters[-1]
    try:
        files = adapter_files(Path(adapter.path))
    except FileNotFoundError as e:
        raise HandlerError(grpc.StatusCode.DATA_LOSS, f"adapter {adapter.version!r}: {e}") from None
    version = adapter.version
    return (
        pb.AdapterChunk(file_name=c.file_name, offset=c.offset, data=c.data, file_size=c.file_size, version=version)
        for c in read_chunks(files, ctx.config.download_chunk_bytes)
    )


def _member_round(ctx: CoordinatorContext, peer_id: str, round_id: str, action: str) -> RoundRecord:
    """The round, checked to exist and to count ``peer_id`` among its members (any state)."""
    record = resolve_round(ctx, round_id)
    if ctx.store.get_member(record.round_id, peer_id) is None:
        raise HandlerError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"peer {peer_id} is not a member of round {record.round_id!r}: Join before you {action}",
        )
    return record


def upload_span_state(ctx: CoordinatorContext, req: pb.UploadSpanStateRequest) -> pb.UploadSpanStateResponse:
    check_name("peer_id", req.peer_id)
    check_count("epoch", req.epoch)
    check_count("samples", req.samples)
    if not req.HasField("span"):
        raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT, "span must be set to the span the state belongs to")
    with ctx.lock:
        record = _member_round(ctx, req.peer_id, req.round_id, "upload a span state")
        if record.state not in (RoundState.TRAINING, RoundState.FINALIZING):
            raise HandlerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {record.round_id!r} is {record.state.value}: span states are taken while it is "
                f"training or finalizing",
            )
        spec = record.spec
        index = span_index(spec, req.span)
    check_safetensors(req.safetensors)
    relpath = span_state_relpath(record.round_id, spec.spans[index], req.peer_id, req.epoch)
    sha256 = write_atomic(ctx.config.blob_dir / relpath, req.safetensors)  # outside the lock: may be large
    size = len(req.safetensors)
    upload = SpanStateUpload(record.round_id, req.peer_id, index, req.epoch, relpath, sha256, size, req.samples,
                             ctx.clock())  # fmt: skip
    with ctx.lock:
        ctx.store.put_span_state(upload)
    return pb.UploadSpanStateResponse(ok=True, sha256=sha256, size_bytes=size)


def report_eval(ctx: CoordinatorContext, req: pb.ReportEvalRequest) -> pb.ReportEvalResponse:
    check_name("peer_id", req.peer_id)
    if req.adapter_version:
        check_name("adapter_version", req.adapter_version)
    check_count("epoch", req.epoch)
    check_real("eval_loss", req.eval_loss, minimum=0.0)
    check_count("eval_tokens", req.eval_tokens, minimum=1)
    with ctx.lock:
        record = _member_round(ctx, req.peer_id, req.round_id, "report an eval")
        report = EvalReport(record.round_id, req.peer_id, req.adapter_version, req.epoch, req.eval_loss,
                            req.eval_tokens, ctx.clock())  # fmt: skip
        ctx.store.add_eval_report(report)
    return pb.ReportEvalResponse(ok=True)
