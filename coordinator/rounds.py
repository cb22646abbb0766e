"""Round operations on a store: open, measure progress, advance through the lifecycle.

These are the building blocks the handlers, the sweep and (later) finalization call. Callers
hold the coordinator lock around them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from coordinator.assignment import Replica, span_loads
from coordinator.lifecycle import (
    RoundEvent,
    RoundProgress,
    end_reason,
    lower_median,
    round_epochs,
    transition,
    trusted_samples,
)
from coordinator.state import AlreadyExists, CoordinatorStore, MemberRecord, MemberState, RoundRecord
from swarm.config import RoundSpec, SpanRange
from swarm.proto import NO_SPAN, RoundState

log = logging.getLogger(__name__)


class RoundConflict(ValueError):
    """The round cannot be opened (another is active, the id is taken, the parent is unknown)."""


def open_round(store: CoordinatorStore, spec: RoundSpec, now: float) -> RoundRecord:
    """Create ``spec`` as a new open round; :class:`RoundConflict` says why it cannot be."""
    active = store.active_round()
    if active is not None:
        raise RoundConflict(
            f"round {active.round_id!r} is still {active.state.value}: finish or fail it before opening "
            f"round {spec.round_id!r}"
        )
    if spec.parent_adapter and store.get_adapter(spec.parent_adapter) is None:
        raise RoundConflict(
            f"round {spec.round_id!r} starts from adapter {spec.parent_adapter!r}, which is not in the "
            f"registry: publish it first or set parent_adapter to ''"
        )
    record = RoundRecord.new(spec, now)
    try:
        store.create_round(record)
    except AlreadyExists:
        existing = store.get_round(spec.round_id)
        state = existing.state.value if existing else "unknown"
        raise RoundConflict(
            f"round id {spec.round_id!r} was already used (that round is {state}): give the new round a new round_id"
        ) from None
    log.info("opened round %s (%d spans)", spec.round_id, len(spec.spans))
    return record


def allowed_spans(spans: Sequence[SpanRange], member: MemberRecord) -> frozenset[int] | None:
    """The spans ``member`` may host: the one it chose, those that fit its ``max_blocks``, or None (any)."""
    if member.pinned:
        return frozenset({member.span_index})
    if member.capacity.max_blocks:
        return frozenset(i for i, s in enumerate(spans) if len(s) <= member.capacity.max_blocks)
    return None


def live_replicas(store: CoordinatorStore, round_id: str, spans: Sequence[SpanRange] = ()) -> list[Replica]:
    """The round's live span hosts as :class:`Replica` (trainer-only members host none); with the round's ``spans``,
    each says where it may move."""
    return [
        Replica(m.peer_id, m.span_index, m.throughput, allowed_spans(spans, m) if spans else None)
        for m in store.list_members(round_id, MemberState.LIVE)
        if m.span_index != NO_SPAN
    ]


class _Member(Protocol):
    @property
    def span_index(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def live(self) -> bool: ...


def span_epochs(members: Sequence[_Member], num_spans: int) -> dict[int, int]:
    """Each span's epoch by its members' heartbeats: the lower median over live members (every member if none
    is live), so one member claiming a huge epoch does not move a span it shares with honest replicas."""
    every: dict[int, list[int]] = {i: [] for i in range(num_spans)}
    live: dict[int, list[int]] = {i: [] for i in range(num_spans)}
    for m in members:
        if m.span_index in every:
            every[m.span_index].append(m.epoch)
            if m.live:
                live[m.span_index].append(m.epoch)
    return {i: lower_median(live[i] or every[i]) for i in range(num_spans)}


def round_progress(store: CoordinatorStore, record: RoundRecord, now: float) -> RoundProgress:
    """Trusted progress: epochs of the slowest span group (:func:`span_epochs`); samples from contributions,
    capped by those epochs (:func:`~coordinator.lifecycle.trusted_samples`); seconds since training began."""
    spec = record.spec
    epochs = round_epochs(span_epochs(store.list_members(record.round_id), len(spec.spans)), len(spec.spans))
    claimed = sum(c.samples for c in store.list_contributions(record.round_id))
    samples = trusted_samples(claimed, epochs, spec.optimizer.target_batch_size)
    elapsed = now - record.started_at if record.started_at is not None else 0.0
    return RoundProgress(samples, epochs, max(elapsed, 0.0))


def apply_event(
    store: CoordinatorStore, record: RoundRecord, event: RoundEvent, now: float, why: str = ""
) -> RoundRecord:
    """Move ``record`` through ``event`` (lifecycle rules apply), stamp the start/end time, store ``why``."""
    state = transition(record.state, event)
    updated = store.set_round_state(
        record.round_id,
        state,
        expected=record.state,
        started_at=now if state is RoundState.TRAINING else None,
        ended_at=now if state in (RoundState.FINALIZING, RoundState.FAILED) else None,
        reason=why,
    )
    log.info("round %s: %s -> %s%s", record.round_id, record.state.value, state.value, f" ({why})" if why else "")
    return updated


def advance(
    store: CoordinatorStore,
    record: RoundRecord,
    now: float,
    progress: Callable[[RoundRecord, float], RoundProgress] | None = None,
) -> RoundRecord:
    """Take the automatic steps: start once every span is served, end once a limit is reached.

    ``progress`` computes the round's progress (default :func:`round_progress` from the store; heartbeats pass
    their index's, coordinator.progress)."""
    if record.state is RoundState.OPEN:
        loads = span_loads(live_replicas(store, record.round_id), len(record.spec.spans))
        if all(s.replicas > 0 for s in loads):
            record = apply_event(store, record, RoundEvent.START, now, "every span has a live server")
    if record.state is RoundState.TRAINING:
        measured = round_progress(store, record, now) if progress is None else progress(record, now)
        reason = end_reason(record.spec.end, measured)
        if reason is not None:
            record = apply_event(store, record, RoundEvent.END, now, reason)
    return record
