"""Membership upkeep: mark silent peers dead and move peers to spans that lost their last server."""

from __future__ import annotations

import logging
import threading

from coordinator.accusations import verdicts
from coordinator.assignment import Move, rebalance
from coordinator.context import CoordinatorContext
from coordinator.rounds import advance, live_replicas
from coordinator.state import MemberState, RoundRecord
from swarm.proto import RoundState

log = logging.getLogger(__name__)


def rebalance_round(ctx: CoordinatorContext, record: RoundRecord) -> list[Move]:
    """Apply :func:`~coordinator.assignment.rebalance` to an open or training round."""
    if record.state not in (RoundState.OPEN, RoundState.TRAINING):
        return []
    spans = record.spec.spans
    moves = rebalance(live_replicas(ctx.store, record.round_id, spans), len(spans))
    if moves:
        ctx.store.move_members(record.round_id, {m.peer_id: m.to_span for m in moves})
        ctx.metrics.rebalance_moves.inc(len(moves))
        for m in moves:
            log.info("round %s: moved %s from span %d to uncovered span %d", record.round_id, m.peer_id,
                     m.from_span, m.to_span)  # fmt: skip
    return moves


def expel_accused(ctx: CoordinatorContext, record: RoundRecord) -> list[str]:
    """Expel the live members a quorum accuses (coordinator/accusations.py), then rebalance; returns their ids."""
    if record.state.terminal:
        return []
    expelled = verdicts(ctx.store.list_members(record.round_id), ctx.accusations.against(record.round_id))
    for member in expelled:
        ctx.store.put_member(member)
        ctx.metrics.members_expelled.inc()
        log.warning("round %s: expelled %s: %s", record.round_id, member.peer_id, member.removed_reason)
    if expelled:
        rebalance_round(ctx, record)
    return [m.peer_id for m in expelled]


def expire_members(ctx: CoordinatorContext, record: RoundRecord, now: float) -> list[str]:
    """Mark live members silent for ``heartbeat_timeout_s`` dead, then rebalance; returns their ids."""
    if record.state.terminal:
        return []
    cutoff = now - ctx.config.heartbeat_timeout_s
    stale = [m.peer_id for m in ctx.store.list_members(record.round_id, MemberState.LIVE) if m.last_heartbeat < cutoff]
    if stale:
        ctx.store.set_member_states(record.round_id, stale, MemberState.DEAD)
        ctx.metrics.members_expired.inc(len(stale))
        log.info("round %s: %d member(s) missed heartbeats: %s", record.round_id, len(stale), ", ".join(stale))
        rebalance_round(ctx, record)
    return stale


def sweep(ctx: CoordinatorContext) -> list[str]:
    """One pass over the active round: expire silent members, then take automatic lifecycle steps."""
    with ctx.lock:
        record = ctx.store.active_round()
        if record is None:
            return []
        now = ctx.clock()
        expired = expire_members(ctx, record, now)
        expel_accused(ctx, record)  # a quorum can also be reached when replicas leave
        advance(ctx.store, record, now)
        return expired


class Sweeper:
    """Runs :func:`sweep` every ``config.effective_sweep_interval_s`` on a daemon thread until stopped."""

    def __init__(self, ctx: CoordinatorContext) -> None:
        self.ctx = ctx
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordinator-sweep", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        interval = self.ctx.config.effective_sweep_interval_s
        while not self._stop.wait(interval):
            try:
                sweep(self.ctx)
            except Exception:  # keep sweeping: one bad pass must not end membership upkeep
                log.exception("membership sweep failed; retrying in %.1f s", interval)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
