"""The membership summary a heartbeat needs, kept current at O(1) store work per heartbeat (coordinator scale).

A heartbeat has to decide whether a member went silent (expiry) and whether the round reached its end
(:func:`coordinator.rounds.round_progress`). Reading that from the store means building every member and
contribution of the round, twice per heartbeat: ~30 us per member, so N peers at r Hz cost r * N**2 * 30 us of
one core per second under the coordinator's lock (``bench/bench_coordinator.py --profile-handlers``). Here one
index per round holds, per member, just the span, epoch, liveness and last heartbeat time, plus the round's
claimed samples. It is rebuilt from the store whenever the store's ``members_generation`` changed (join, leave,
expiry, rebalance) and otherwise follows each heartbeat's own change. Its progress is the same function of the
same values as ``round_progress``'s (a test compares them).
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.lifecycle import RoundProgress, round_epochs, trusted_samples
from coordinator.rounds import span_epochs
from coordinator.state import CoordinatorStore, MemberRecord, RoundRecord


@dataclass
class _Entry:
    span_index: int
    epoch: int
    live: bool
    last_heartbeat: float


class RoundIndex:
    """One round's members as plain entries plus its claimed samples, built at one ``members_generation``."""

    def __init__(self, store: CoordinatorStore, round_id: str):
        self.round_id = round_id
        self.generation = store.members_generation
        self.entries = {
            m.peer_id: _Entry(m.span_index, m.epoch, m.live, m.last_heartbeat) for m in store.list_members(round_id)
        }
        self.claimed = sum(c.samples for c in store.list_contributions(round_id))

    def current(self, store: CoordinatorStore, round_id: str) -> bool:
        return self.round_id == round_id and self.generation == store.members_generation

    def heartbeat(self, before: MemberRecord, after: MemberRecord) -> None:
        """Follow one :meth:`~coordinator.state.CoordinatorStore.record_heartbeat` (``before``: the member it read)."""
        entry = self.entries.get(after.peer_id)
        if entry is None:  # cannot happen under the coordinator's lock; rebuild rather than guess
            self.generation = -1
            return
        entry.epoch, entry.last_heartbeat = after.epoch, after.last_heartbeat
        self.claimed += after.session_samples - before.session_samples

    def any_silent(self, cutoff: float) -> bool:
        """A live member's last heartbeat is older than ``cutoff`` (what ``expire_members`` would mark dead)."""
        return any(e.live and e.last_heartbeat < cutoff for e in self.entries.values())

    def progress(self, record: RoundRecord, now: float) -> RoundProgress:
        spec = record.spec
        epochs = round_epochs(span_epochs(list(self.entries.values()), len(spec.spans)), len(spec.spans))
        samples = trusted_samples(self.claimed, epochs, spec.optimizer.target_batch_size)
        elapsed = now - record.started_at if record.started_at is not None else 0.0
        return RoundProgress(samples, epochs, max(elapsed, 0.0))


class ProgressIndex:
    """The index of the round heartbeats are for (one at a time: heartbeats go to the active round)."""

    def __init__(self) -> None:
        self._index: RoundIndex | None = None

    def of(self, store: CoordinatorStore, round_id: str) -> RoundIndex:
        """The current index of ``round_id``; call with the coordinator's lock held."""
        index = self._index
        if index is None or not index.current(store, round_id):
            index = self._index = RoundIndex(store, round_id)
        return index
