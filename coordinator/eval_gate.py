"""The eval gate of a finalizing round: evaluators the coordinator picks, the median of their reports.

Rules (after :mod:`coordinator.finalize` has assembled the candidate adapter):

4. **Evaluators.** When the operator runs evaluators (``evaluator_ids``, :mod:`coordinator.evaluators`),
   they are the evaluators: each loads base + candidate itself and reports the candidate's loss
   (``adapter_version ""``) and the round start's (``"round-start"``), both naming the candidate's
   sha256; members' reports then count for nothing. Otherwise the coordinator picks up to
   ``eval_quorum`` members among those that reported a
   starting eval (``adapter_version == ""``, epoch 0, before training stopped): the ones with the
   smallest ``sha256(round_id | ended_at | peer_id)``. No peer steers the pick: its id was fixed at
   Join (it is its key) and ``ended_at`` was unknown then. Picked evaluators learn the candidate's
   sha256 from ``HeartbeatResponse.eval_candidate_sha256``.
5. **Gate.** *before* = median of the evaluators' starting reports (an operator evaluator's
   ``round-start`` report on this candidate); *after* = median of their
   latest reports that name the candidate's sha256. Reports of anyone else, or naming another
   candidate, do not count, and ``eval_tokens`` weighs nothing: one member cannot move a median of
   three. Wait until every live evaluator (every operator evaluator) has reported; after
   ``finalize_timeout_s`` go on with a
   majority of the evaluators; fail ``no_eval`` without one and ``worse_than_parent`` unless
   after < before.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from coordinator.finalize import FinalizeError, Outcome
from coordinator.state import EvalReport, MemberRecord, RoundRecord
from swarm.proto import ROUND_START


def _latest_per_peer(reports: Iterable[EvalReport]) -> dict[str, EvalReport]:
    latest: dict[str, EvalReport] = {}
    for r in reports:
        latest[r.peer_id] = r
    return latest


def starting_reports(record: RoundRecord, reports: list[EvalReport]) -> dict[str, EvalReport]:
    """Each member's latest starting eval (the loss of the round's starting point)."""
    ended = record.ended_at if record.ended_at is not None else float("inf")
    own = (r for r in reports if not r.adapter_version and not r.candidate_sha256)
    return _latest_per_peer(r for r in own if r.epoch == 0 and r.reported_at < ended)


def pick_evaluators(record: RoundRecord, reports: list[EvalReport], quorum: int) -> tuple[str, ...]:
    """Rule 4: up to ``quorum`` members that reported a starting eval, in an order no peer controls."""

    def rank(peer_id: str) -> str:
        return hashlib.sha256(f"{record.round_id}|{record.ended_at!r}|{peer_id}".encode()).hexdigest()

    return tuple(sorted(starting_reports(record, reports), key=rank)[:quorum])


@dataclass(frozen=True)
class Tally:
    evaluators: tuple[str, ...]
    before: dict[str, float]  # evaluator -> starting loss
    after: dict[str, float]  # evaluator -> loss of the candidate
    waiting_for: list[str] = field(default_factory=list)

    @property
    def majority(self) -> int:
        return len(self.evaluators) // 2 + 1

    @property
    def counted(self) -> list[str]:
        """Evaluators with both reports."""
        return [p for p in self.evaluators if p in self.before and p in self.after]


def tally(
    record: RoundRecord,
    members: list[MemberRecord],
    reports: list[EvalReport],
    sha256: str,
    evaluators: tuple[str, ...],
    operator: bool = False,
) -> Tally:
    """What the evaluators reported on candidate ``sha256`` (rule 5); ``operator``: they are the operator's."""
    chosen = set(evaluators)
    named = [r for r in reports if r.candidate_sha256 == sha256 and r.peer_id in chosen]
    after = {p: r.eval_loss for p, r in _latest_per_peer(r for r in named if not r.adapter_version).items()}
    if operator:
        start = _latest_per_peer(r for r in named if r.adapter_version == ROUND_START)
        before = {p: r.eval_loss for p, r in start.items()}
        owing = [p for p in evaluators if p not in after or p not in before]
    else:
        before = {p: r.eval_loss for p, r in starting_reports(record, reports).items() if p in chosen}
        live = {m.peer_id for m in members if m.live}
        owing = [p for p in evaluators if p in live and p not in after]
    return Tally(evaluators, before, after, [f"eval of candidate {sha256[:12]} from {p}" for p in owing])


def decide(t: Tally, elapsed_s: float, timeout_s: float) -> bool:
    """True to gate now, False to wait; :class:`FinalizeError` once the timeout leaves too few reports."""
    if not t.evaluators:
        raise FinalizeError(
            Outcome.NO_EVAL, "no member reported a starting eval before training stopped: nobody to evaluate"
        )
    if not t.waiting_for and len(t.counted) >= t.majority:
        return True
    if elapsed_s < timeout_s:
        return False
    if len(t.counted) < t.majority:
        raise FinalizeError(
            Outcome.NO_EVAL,
            f"after {timeout_s:g} s only {len(t.counted)} of {len(t.evaluators)} picked evaluator(s) reported on "
            f"the candidate (a majority, {t.majority}, is needed)",
        )
    return True


def gate(t: Tally) -> tuple[float, float]:
    """``(loss_before, loss_after)``: medians over the evaluators that reported both, if after < before."""
    counted = t.counted
    if len(counted) < t.majority:
        raise FinalizeError(Outcome.NO_EVAL, f"{len(counted)} evaluator report(s), {t.majority} needed")
    before = float(statistics.median(t.before[p] for p in counted))
    after = float(statistics.median(t.after[p] for p in counted))
    if not after < before:
        raise FinalizeError(
            Outcome.WORSE_THAN_PARENT,
            f"eval loss after training {after:.6g} is not below the starting point's {before:.6g} "
            f"(median of {len(counted)} evaluator(s)): not published",
        )
    return before, after
