"""The round state machine and the end condition, as pure functions."""

from __future__ import annotations

import pytest

from coordinator.lifecycle import (
    IllegalTransition,
    RoundEvent,
    RoundProgress,
    action_for,
    allowed_events,
    end_reason,
    round_epochs,
    transition,
)
from swarm.config import EndCondition
from swarm.proto import Action, RoundState

pytestmark = pytest.mark.timeout(10)

S, E = RoundState, RoundEvent


def test_happy_path() -> None:
    state = S.OPEN
    for event, expected in [(E.START, S.TRAINING), (E.END, S.FINALIZING), (E.PUBLISH, S.PUBLISHED)]:
        state = transition(state, event)
        assert state is expected


@pytest.mark.parametrize("state", [S.OPEN, S.TRAINING, S.FINALIZING])
def test_any_active_round_can_fail(state: RoundState) -> None:
    assert transition(state, E.FAIL) is S.FAILED


@pytest.mark.parametrize(
    ("state", "event"),
    [(S.OPEN, E.END), (S.OPEN, E.PUBLISH), (S.TRAINING, E.START), (S.TRAINING, E.PUBLISH),
     (S.FINALIZING, E.START), (S.FINALIZING, E.END), (S.PUBLISHED, E.FAIL), (S.FAILED, E.START)],
)  # fmt: skip
def test_illegal_transitions_say_what_is_allowed(state: RoundState, event: RoundEvent) -> None:
    with pytest.raises(IllegalTransition, match=f"cannot {event.value} a round that is {state.value}"):
        transition(state, event)


def test_terminal_states_allow_nothing() -> None:
    assert allowed_events(S.PUBLISHED) == [] and allowed_events(S.FAILED) == []
    with pytest.raises(IllegalTransition, match="none, the round is over"):
        transition(S.PUBLISHED, E.PUBLISH)
    assert allowed_events(S.TRAINING) == [E.END, E.FAIL]


def test_end_condition_first_limit_wins() -> None:
    end = EndCondition(target_samples=100, target_epochs=3, deadline_s=60)
    assert end_reason(end, RoundProgress(99, 2, 59.0)) is None
    assert "target_samples 100" in (end_reason(end, RoundProgress(100, 0, 0.0)) or "")
    assert "target_epochs 3" in (end_reason(end, RoundProgress(0, 3, 0.0)) or "")
    assert "deadline_s 60" in (end_reason(end, RoundProgress(0, 0, 61.0)) or "")


def test_unused_limits_never_end_a_round() -> None:
    end = EndCondition(target_epochs=2)  # target_samples = deadline = 0 mean "unused"
    assert end_reason(end, RoundProgress(10**9, 1, 10**6)) is None
    assert end_reason(end, RoundProgress(0, 2, 0.0)) is not None


def test_round_epochs_is_the_slowest_span() -> None:
    assert round_epochs({0: 5, 1: 3, 2: 4}, 3) == 3
    assert round_epochs({0: 5, 2: 4}, 3) == 0  # span 1 never reported


def test_actions() -> None:
    assert [action_for(s) for s in S] == [Action.WAIT, Action.CONTINUE, Action.FINALIZE, Action.STOP, Action.STOP]
