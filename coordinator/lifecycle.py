"""Round lifecycle as pure functions: the state machine and the end-condition check.

::

    open --start--> training --end--> finalizing --publish--> published
      \\________________\\__________________\\--fail--> failed
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from swarm.config import EndCondition
from swarm.proto import Action, RoundState


class RoundEvent(str, Enum):
    START = "start"  # every span has a live server: training begins
    END = "end"  # the end condition is reached: collect span states
    PUBLISH = "publish"  # the merged adapter passed its checks and is published
    FAIL = "fail"  # give up on the round (operator, or finalization failed)


_TRANSITIONS: dict[tuple[RoundState, RoundEvent], RoundState] = {
    (RoundState.OPEN, RoundEvent.START): RoundState.TRAINING,
    (RoundState.TRAINING, RoundEvent.END): RoundState.FINALIZING,
    (RoundState.FINALIZING, RoundEvent.PUBLISH): RoundState.PUBLISHED,
    (RoundState.OPEN, RoundEvent.FAIL): RoundState.FAILED,
    (RoundState.TRAINING, RoundEvent.FAIL): RoundState.FAILED,
    (RoundState.FINALIZING, RoundEvent.FAIL): RoundState.FAILED,
}


class IllegalTransition(ValueError):
    pass


def allowed_events(state: RoundState) -> list[RoundEvent]:
    return [e for (s, e) in _TRANSITIONS if s is state]


def transition(state: RoundState, event: RoundEvent) -> RoundState:
    """The state after ``event``; :class:`IllegalTransition` naming the allowed events otherwise."""
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        allowed = ", ".join(e.value for e in allowed_events(state)) or "none, the round is over"
        raise IllegalTransition(
            f"cannot {event.value} a round that is {state.value}; allowed events: {allowed}"
        ) from None


@dataclass(frozen=True)
class RoundProgress:
    """How far a round got: swarm-wide samples, the slowest span group's epoch, seconds trained."""

    samples: int
    epochs: int
    elapsed_s: float


def end_reason(end: EndCondition, progress: RoundProgress) -> str | None:
    """Why the round should stop training (the first limit reached), or ``None`` to go on."""
    if end.target_samples and progress.samples >= end.target_samples:
        return f"target_samples {end.target_samples} reached ({progress.samples} samples)"
    if end.target_epochs and progress.epochs >= end.target_epochs:
        return f"target_epochs {end.target_epochs} reached (every span at epoch >= {progress.epochs})"
    if end.deadline_s and progress.elapsed_s >= end.deadline_s:
        return f"deadline_s {end.deadline_s:g} reached ({progress.elapsed_s:.0f} s of training)"
    return None


def lower_median(values: Iterable[int]) -> int:
    """The lower median (0 for none): with two values, the smaller; one member cannot raise it alone."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0


def trusted_samples(claimed: int, epochs: int, target_batch_size: int) -> int:
    """Samples the coordinator counts: what members claim, but no more than the epochs it trusts allow
    (each epoch is ``target_batch_size`` samples swarm-wide, plus one epoch in progress)."""
    return min(claimed, (epochs + 1) * target_batch_size)


def round_epochs(epoch_by_span: dict[int, int], num_spans: int) -> int:
    """A round's epoch is its slowest span group's: the minimum over spans (0 if a span never reported)."""
    return min(epoch_by_span.get(i, 0) for i in range(num_spans))


def action_for(state: RoundState) -> Action:
    """What a live member does next in a round that is ``state``."""
    return {
        RoundState.OPEN: Action.WAIT,
        RoundState.TRAINING: Action.CONTINUE,
        RoundState.FINALIZING: Action.FINALIZE,
        RoundState.PUBLISHED: Action.STOP,
        RoundState.FAILED: Action.STOP,
    }[state]
