"""Data RPCs as plain functions: adapters out (list, download), span states and eval reports in."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc

from coordinator.auth import check_credential
from coordinator.blobs import adapter_files, read_chunks, span_state_relpath, write_atomic
from coordinator.context import CoordinatorContext
from coordinator.evaluators import check_evaluator
from coordinator.handlers import resolve_round
from coordinator.state import AdapterRecord, EvalReport, MemberRecord, MemberState, RoundRecord, SpanStateUpload
from coordinator.validation import HandlerError, check_count, check_name, check_real, check_safetensors, span_index
from swarm.proto import CANDIDATE_PREFIX, RoundState
from swarm.proto import coordinator_pb2 as pb

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    if req.version.startswith(CANDIDATE_PREFIX):
        return _candidate_chunks(ctx, req.version)
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


#: Uploads one member may make per round (each up to max_message_mb): bounds the disk an attacker can fill.
MAX_UPLOADS_PER_MEMBER = 4


def _candidate_chunks(ctx: CoordinatorContext, version: str) -> Iterator[pb.AdapterChunk]:
    """The finalizing round's candidate, as one file ``candidate.safetensors`` (NOT_FOUND once it is gone)."""
    sha256 = version[len(CANDIDATE_PREFIX) :]
    candidate = next((c for c in list(ctx.candidates.values()) if c.sha256 == sha256), None)
    if candidate is None:
        raise HandlerError(grpc.StatusCode.NOT_FOUND, f"no candidate {sha256[:64]!r} is being evaluated")
    return (
        pb.AdapterChunk(file_name="candidate.safetensors", offset=c.offset, data=c.data, file_size=c.file_size,
                        version=version)
        for c in read_chunks([Path(candidate.path)], ctx.config.download_chunk_bytes)
    )  # fmt: skip


def _member_round(
    ctx: CoordinatorContext, peer_id: str, round_id: str, credential: str, action: str
) -> tuple[RoundRecord, MemberRecord]:
    """The round and the caller's membership (any state), checked against the membership's credential."""
    record = resolve_round(ctx, round_id)
    member = ctx.store.get_member(record.round_id, peer_id)
    if member is None and not credential:
        raise HandlerError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"peer {peer_id} is not a member of round {record.round_id!r}: Join before you {action}",
        )
    return record, check_credential(member, peer_id, credential)


def upload_span_state(ctx: CoordinatorContext, req: pb.UploadSpanStateRequest) -> pb.UploadSpanStateResponse:
    check_name("peer_id", req.peer_id)
    check_count("epoch", req.epoch)
    check_count("samples", req.samples)
    if not req.HasField("span"):
        raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT, "span must be set to the span the state belongs to")
    with ctx.lock:
        record, member = _member_round(ctx, req.peer_id, req.round_id, req.credential, "upload a span state")
        if record.state not in (RoundState.TRAINING, RoundState.FINALIZING):
            raise HandlerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {record.round_id!r} is {record.state.value}: span states are taken while it is "
                f"training or finalizing",
            )
        if member.state is MemberState.EXPELLED:
            raise HandlerError(grpc.StatusCode.PERMISSION_DENIED,
                               f"peer {req.peer_id} was removed from round {record.round_id!r}: {member.removed_reason}")  # fmt: skip
        spec = record.spec
        index = span_index(spec, req.span)
        if index != member.span_index:
            raise HandlerError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"peer {req.peer_id} is assigned span {spec.spans[member.span_index].name}, not "
                f"{spec.spans[index].name}: a member uploads only the span it serves",
            )
        if req.epoch > member.epoch + 1:
            raise HandlerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"epoch {req.epoch} is ahead of the epoch {member.epoch} your heartbeats reported: heartbeat first",
            )
        mine = [u for u in ctx.store.list_span_states(record.round_id) if u.peer_id == req.peer_id]
        if len({u.epoch for u in mine} | {req.epoch}) > MAX_UPLOADS_PER_MEMBER:
            raise HandlerError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"at most {MAX_UPLOADS_PER_MEMBER} uploads (epochs) per member and round")  # fmt: skip
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
    if req.candidate_sha256 and not _SHA256.match(req.candidate_sha256):
        raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT, "candidate_sha256 must be 64 lowercase hex digits")
    with ctx.lock:
        if req.peer_id in ctx.config.evaluator_ids:
            check_evaluator(ctx, req.peer_id, req.credential)
            record = resolve_round(ctx, req.round_id)
        else:
            record, _ = _member_round(ctx, req.peer_id, req.round_id, req.credential, "report an eval")
        mine = ctx.store.count_eval_reports(record.round_id, req.peer_id)
        if mine >= ctx.config.max_eval_reports:
            raise HandlerError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"at most {ctx.config.max_eval_reports} eval reports per member and round")  # fmt: skip
        report = EvalReport(record.round_id, req.peer_id, req.adapter_version, req.epoch, req.eval_loss,
                            req.eval_tokens, ctx.clock(), req.candidate_sha256)  # fmt: skip
        ctx.store.add_eval_report(report)
    return pb.ReportEvalResponse(ok=True)
