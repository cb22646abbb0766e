"""Membership RPCs as plain functions: (context, request message) -> response message.

Raise :class:`~coordinator.validation.HandlerError` for a failed call; the servicer turns it
into a gRPC status. Tests call these directly, without sockets.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

import grpc

from coordinator import accusations
from coordinator.assignment import choose_span
from coordinator.auth import check_credential, new_credential, verify_join
from coordinator.context import CoordinatorContext
from coordinator.evaluators import join_evaluator
from coordinator.lifecycle import RoundProgress, action_for
from coordinator.membership import expel_accused, expire_members, rebalance_round
from coordinator.rounds import advance, live_replicas, round_progress
from coordinator.state import Capacity, Heartbeat, JoinRejection, MemberRecord, MemberState, RoundRecord
from coordinator.state import Conflict as StoreConflict
from coordinator.validation import (
    HandlerError,
    check_count,
    check_multiaddrs,
    check_name,
    check_nonce,
    check_real,
    invalid,
    span_index,
    span_message,
)
from swarm import software_compatible
from swarm.config import RoundSpec, SpanRange
from swarm.proto import EVALUATOR_ROLE, NO_SPAN, TRAINER_ROLE, Action, RejectCode, RoundState
from swarm.proto import coordinator_pb2 as pb


def resolve_round(ctx: CoordinatorContext, round_id: str) -> RoundRecord:
    """The named round (NOT_FOUND naming it), or the current one for ``''``."""
    if round_id:
        record = ctx.store.get_round(round_id)
        if record is None:
            current = ctx.store.current_round()
            hint = f"; the current round is {current.round_id!r}" if current else "; no round exists yet"
            raise HandlerError(grpc.StatusCode.NOT_FOUND, f"round {round_id[:128]!r} does not exist{hint}")
        return record
    record = ctx.store.current_round()
    if record is None:
        raise HandlerError(grpc.StatusCode.NOT_FOUND, "no round exists yet: the operator must open one")
    return record


def refresh(ctx: CoordinatorContext, record: RoundRecord, now: float) -> RoundRecord:
    """Lazy upkeep on every request: expire silent members, take automatic lifecycle steps.

    Reads the round's membership index (coordinator.progress), not every member: whether anyone went silent,
    and the progress that decides the end."""
    if not record.state.terminal and ctx.progress.of(ctx.store, record.round_id).any_silent(
        now - ctx.config.heartbeat_timeout_s
    ):
        expire_members(ctx, record, now)
    return advance(ctx.store, record, now, _indexed_progress(ctx))


def _reject(ctx: CoordinatorContext, req: pb.JoinRequest, round_id: str, code: RejectCode, why: str) -> None:
    """Count a refused join and keep it in a bounded in-memory list (never in the store: refusals are free)."""
    ctx.rejections.append(JoinRejection(req.peer_id[:128], round_id[:128], code.value, why, ctx.clock()))
    ctx.metrics.join_rejections.labels(reason=code.value).inc()


def _refuse(
    ctx: CoordinatorContext, req: pb.JoinRequest, record: RoundRecord, code: RejectCode, why: str
) -> pb.JoinResponse:
    _reject(ctx, req, record.round_id, code, why)
    return pb.JoinResponse(accepted=False, reject_reason=why, reject_code=code.value, round_id=record.round_id)


QUANTIZE_KINDS = ("", "none", "nf4", "int8")


def _preferred_span(spec: RoundSpec, req: pb.JoinRequest, fits: list[int]) -> tuple[int | None, str]:
    """The span the peer asked for (index, or None when it left the choice to us), or why it cannot be had."""
    names = ", ".join(s.name for s in spec.spans)
    limit = f"this peer hosts at most {req.max_blocks} block(s) (its --num-blocks or free GPU memory)"
    if req.HasField("preferred_span"):
        want = req.preferred_span
        try:
            index = spec.span_index(SpanRange(start=want.start, end=want.end))
        except ValueError:  # not a span of the round (or not a span at all: end <= start)
            return None, (
                f"span {want.start}-{want.end} is not a span of round {spec.round_id!r} (its spans: {names}): "
                "pass one of them with --span or --span-index, or neither to let the coordinator choose"
            )
        if index not in fits:
            return None, f"span {want.start}-{want.end} has {want.end - want.start} blocks but {limit}"
        return index, ""
    if not fits:
        return None, f"no span of round {spec.round_id!r} fits: its spans are {names}, and {limit}"
    return None, ""


def join(ctx: CoordinatorContext, req: pb.JoinRequest) -> pb.JoinResponse:
    check_name("peer_id", req.peer_id)
    check_nonce(req.spec_nonce)
    check_multiaddrs(req.multiaddrs)
    check_real("capacity.throughput", req.capacity.throughput, minimum=0.0)
    if req.quantize not in QUANTIZE_KINDS:
        raise invalid(f"quantize must be one of none, nf4, int8; got {req.quantize[:32]!r}")
    if req.role == EVALUATOR_ROLE:
        return join_evaluator(ctx, req)
    if req.role not in ("", TRAINER_ROLE):
        raise invalid(f"role {req.role[:32]!r} is unknown: use '' (a member), {TRAINER_ROLE!r} or {EVALUATOR_ROLE!r}")
    trainer_only = req.role == TRAINER_ROLE
    if ctx.config.join_token and not hmac.compare_digest(req.join_token.encode(), ctx.config.join_token.encode()):
        why = "join_token is wrong or missing: ask the coordinator's operator for the round's token"
        _reject(ctx, req, req.round_id, RejectCode.JOIN_TOKEN, why)
        raise HandlerError(grpc.StatusCode.PERMISSION_DENIED, why)
    verify_join(ctx.challenges, req)  # outside the lock: an RSA check takes a millisecond
    credential, digest = new_credential()
    with ctx.lock:
        if req.round_id:
            record = resolve_round(ctx, req.round_id)
        else:
            active = ctx.store.active_round()
            if active is None:
                raise HandlerError(grpc.StatusCode.FAILED_PRECONDITION, "no round is open for joining; retry later")
            record = active
        now = ctx.clock()
        record = refresh(ctx, record, now)
        spec = record.spec
        if record.state not in (RoundState.OPEN, RoundState.TRAINING):
            why = f"round {record.round_id!r} is {record.state.value}: wait for the next round and join it"
            return _refuse(ctx, req, record, RejectCode.ROUND_CLOSED, why)
        if spec.base.fingerprint and req.base_fingerprint != spec.base.fingerprint:
            why = (
                f"base model fingerprint {req.base_fingerprint or '(none)'} does not match the round's "
                f"{spec.base.fingerprint}: load the base model {spec.base.path} and join again"
            )
            return _refuse(ctx, req, record, RejectCode.FINGERPRINT, why)
        required = ctx.config.software_version
        if not software_compatible(req.software_version, required):
            why = (
                f"software version {req.software_version or '(none)'} is not compatible with the coordinator's "
                f"{required}: install loraswarm {'.'.join(required.split('.')[:2])}.x and join again"
            )
            return _refuse(ctx, req, record, RejectCode.SOFTWARE_VERSION, why)

        fits = [i for i, s in enumerate(spec.spans) if not req.max_blocks or len(s) <= req.max_blocks]
        preferred, why = (None, "") if trainer_only else _preferred_span(spec, req, fits)
        if why:
            return _refuse(ctx, req, record, RejectCode.SPAN, why)
        previous = ctx.store.get_member(record.round_id, req.peer_id)
        if previous is not None and previous.state is MemberState.EXPELLED:
            why = (
                f"this peer was removed from round {record.round_id!r} ({previous.removed_reason}): join the next round"
            )
            return _refuse(ctx, req, record, RejectCode.EXPELLED, why)
        if trainer_only:
            index, epoch = NO_SPAN, 0
        elif preferred is not None:
            kept = previous is not None and previous.live and previous.span_index == preferred
            index, epoch = preferred, previous.epoch if kept and previous else 0
        elif previous is not None and previous.live and previous.span_index in fits:
            index, epoch = previous.span_index, previous.epoch  # a quick restart keeps its span
        else:
            others = [r for r in live_replicas(ctx.store, record.round_id) if r.peer_id != req.peer_id]
            index, epoch = choose_span(others, len(spec.spans), fits), 0
        cap = Capacity(req.capacity.memory_bytes, req.capacity.device, req.capacity.throughput, req.max_blocks,
                       req.quantize)  # fmt: skip
        member = MemberRecord(record.round_id, req.peer_id, index, tuple(req.multiaddrs), cap, cap.throughput,
                              joined_at=now, last_heartbeat=now, epoch=epoch, credential_sha256=digest,
                              pinned=preferred is not None)  # fmt: skip
        ctx.store.put_member(member)
        advance(ctx.store, record, now)
    return pb.JoinResponse(
        accepted=True,
        span=span_message(spec.spans[index]) if index != NO_SPAN else None,
        round_spec_json=record.spec_json,
        heartbeat_interval_s=ctx.config.heartbeat_interval_s,
        round_id=record.round_id,
        dht_initial_peers=list(ctx.dht_initial_peers),
        credential=credential,
        round_spec_signature=ctx.spec_signature(record.spec_json, req.spec_nonce),
    )


def plausible(ctx: CoordinatorContext, member: MemberRecord, beat: Heartbeat, seq_len: int, now: float) -> Heartbeat:
    """``beat`` with its counters' increase capped by what a member can do since its last heartbeat.

    At most ``max_samples_per_s`` samples per second and ``seq_len`` tokens per sample are counted; the
    rest is counted later (counters are cumulative), so one heartbeat cannot end a round by itself.
    """
    elapsed = max(now - member.last_heartbeat, 0.0)
    max_samples = member.session_samples + int(ctx.config.max_samples_per_s * elapsed)
    samples = min(beat.samples, max(max_samples, member.session_samples))
    max_tokens = member.session_tokens + (samples - member.session_samples) * seq_len
    tokens = min(beat.tokens, max(max_tokens, member.session_tokens))
    if (samples, tokens) == (beat.samples, beat.tokens):
        return beat
    return Heartbeat(samples, tokens, beat.epoch, beat.loss, beat.throughput)


def candidate_for(ctx: CoordinatorContext, record: RoundRecord, peer_id: str) -> str:
    """The candidate's sha256 when ``peer_id`` is one of its picked evaluators, else ''."""
    candidate = ctx.candidates.get(record.round_id) if record.state is RoundState.FINALIZING else None
    return candidate.sha256 if candidate is not None and peer_id in candidate.evaluators else ""


def _beat(req: pb.HeartbeatRequest) -> Heartbeat:
    p = req.progress
    check_count("progress.samples", p.samples)
    check_count("progress.tokens", p.tokens)
    check_count("progress.epoch", p.epoch)
    check_real("progress.loss", p.loss)
    check_real("progress.throughput", p.throughput, minimum=0.0)
    return Heartbeat(p.samples, p.tokens, p.epoch, p.loss if p.loss != 0 else None, p.throughput)


def _indexed_progress(ctx: CoordinatorContext) -> Callable[[RoundRecord, float], RoundProgress]:
    return lambda record, now: ctx.progress.of(ctx.store, record.round_id).progress(record, now)


def heartbeat(ctx: CoordinatorContext, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
    check_name("peer_id", req.peer_id)
    beat = _beat(req)
    accused = accusations.parse(req.peer_id, list(req.accusations))
    interval = ctx.config.heartbeat_interval_s
    with ctx.lock:
        record = resolve_round(ctx, req.round_id)
        now = ctx.clock()
        record = refresh(ctx, record, now)
        member = ctx.store.get_member(record.round_id, req.peer_id)
        if member is not None:
            member = check_credential(member, req.peer_id, req.credential)
        if member is not None and member.state is MemberState.EXPELLED:
            return pb.HeartbeatResponse(
                ok=False, round_state=record.state.value, action=Action.STOP.value, heartbeat_interval_s=interval,
                message=f"peer {req.peer_id} was removed from round {record.round_id!r}: {member.removed_reason}",
            )  # fmt: skip
        if member is None or not member.live:
            why = "never joined" if member is None else member.state.value
            active = ctx.store.active_round()
            return pb.HeartbeatResponse(
                ok=False, round_state=record.state.value, action=Action.REJOIN.value, heartbeat_interval_s=interval,
                message=f"peer {req.peer_id} is not a live member of round {record.round_id!r} ({why}): call Join",
                next_round_id=active.round_id if active else "",
            )  # fmt: skip
        spec = record.spec
        successor = ctx.store.active_round() if record.state.terminal else None
        if successor is not None:  # this round is over and the next one is open: move there
            return pb.HeartbeatResponse(
                ok=False, round_state=record.state.value, action=Action.REJOIN.value, heartbeat_interval_s=interval,
                next_round_id=successor.round_id,
                message=f"round {record.round_id!r} is {record.state.value}; round {successor.round_id!r} is "
                f"{successor.state.value}: call Join for it",
            )  # fmt: skip
        if req.HasField("span") and span_index(spec, req.span) != member.span_index:
            beat = Heartbeat(beat.samples, beat.tokens, 0, beat.loss, beat.throughput)  # epoch of another group
        beat = plausible(ctx, member, beat, spec.data.seq_len, now)
        index = ctx.progress.of(ctx.store, record.round_id)
        try:
            updated = ctx.store.record_heartbeat(record.round_id, req.peer_id, beat, now)
        except StoreConflict as e:
            raise invalid(
                f"progress: {e}; counters are cumulative since the last Join (Join again after a restart)"
            ) from None
        index.heartbeat(member, updated)
        member = updated
        if ctx.accusations.update(record.round_id, req.peer_id, accused):
            expel_accused(ctx, record)
        record = advance(ctx.store, record, now, _indexed_progress(ctx))
    return pb.HeartbeatResponse(
        ok=True,
        span=span_message(spec.spans[member.span_index]) if member.span_index != NO_SPAN else None,
        round_state=record.state.value,
        action=action_for(record.state).value,
        heartbeat_interval_s=interval,
        eval_candidate_sha256=candidate_for(ctx, record, req.peer_id),
    )


def leave(ctx: CoordinatorContext, req: pb.LeaveRequest) -> pb.LeaveResponse:
    check_name("peer_id", req.peer_id)
    with ctx.lock:
        record = resolve_round(ctx, req.round_id)
        member = ctx.store.get_member(record.round_id, req.peer_id)
        if member is not None:
            member = check_credential(member, req.peer_id, req.credential)
        if member is None or not member.live:
            return pb.LeaveResponse(ok=False)
        ctx.store.set_member_states(record.round_id, [req.peer_id], MemberState.LEFT)
        rebalance_round(ctx, record)
    return pb.LeaveResponse(ok=True)


def get_round_spec(ctx: CoordinatorContext, req: pb.GetRoundSpecRequest) -> pb.GetRoundSpecResponse:
    check_nonce(req.spec_nonce)
    with ctx.lock:
        now = ctx.clock()
        record = refresh(ctx, resolve_round(ctx, req.round_id), now)
        progress = round_progress(ctx.store, record, now)
        published = next((a for a in ctx.store.list_adapters() if a.round_id == record.round_id), None)
        candidate = ctx.candidates.get(record.round_id) if record.state is RoundState.FINALIZING else None
    return pb.GetRoundSpecResponse(
        round_id=record.round_id,
        round_spec_json=record.spec_json,
        state=record.state.value,
        created_at=record.created_at,
        started_at=record.started_at or 0.0,
        ended_at=record.ended_at or 0.0,
        samples=progress.samples,
        epoch=progress.epochs,
        reason=record.reason,
        adapter_version=published.version if published else "",
        join_challenge=ctx.challenges.issue(),
        candidate_sha256=candidate.sha256 if candidate is not None else "",
        round_spec_signature=ctx.spec_signature(record.spec_json, req.spec_nonce),
        server_time=time.time(),
        software_version=ctx.config.software_version,
    )


__all__ = ["get_round_spec", "heartbeat", "join", "leave", "refresh", "resolve_round"]
