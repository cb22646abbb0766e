"""swarm.steps: what a swarm-wide step holds, decided from the trainers' records (pure, no sockets)."""

from __future__ import annotations

import pytest

from swarm.dht_records import StepContribution, TrainerRecord
from swarm.steps import Behind, current_step, participants, share, slots_per_step, step_contents


def rec(peer: str, step: int, closed: bool = False, done: bool = False, **past: list[int]) -> TrainerRecord:
    steps = [StepContribution(step=int(s[1:]), microbatches=mbs, samples=8 * len(mbs)) for s, mbs in past.items()]
    return TrainerRecord(peer_id=peer, step=step, closed=closed, done=done, closed_steps=steps)


def test_shares_split_the_slots_exactly_and_consistently() -> None:
    peers = ["b", "a", "c"]
    shares = {p: share(7, peers, p) for p in peers}
    assert sum(shares.values()) == 7
    assert shares == {"a": 3, "b": 2, "c": 2}
    assert share(4, [], "solo") == 4
    assert slots_per_step(32, 8) == 4


def test_a_step_is_decided_only_once_every_live_trainer_closed_it() -> None:
    open_b = [rec("a", 0, closed=True, s0=[0, 1]), rec("b", 0)]
    assert step_contents(open_b, 0) is None
    closed = [rec("a", 0, closed=True, s0=[0, 1]), rec("b", 0, closed=True, s0=[0, 2])]
    got = step_contents(closed, 0)
    assert got is not None
    assert got.microbatches == {("a", 0), ("a", 1), ("b", 0), ("b", 2)}
    assert got.samples == 32
    # a trainer that moved on to the next step still tells what it put in this one
    moved = [rec("a", 1, s0=[0, 1]), rec("b", 0, closed=True, s0=[0, 2])]
    assert step_contents(moved, 0) == got
    assert got.digest() == step_contents(list(reversed(closed)), 0).digest()  # type: ignore[union-attr]


def test_done_and_dead_trainers_are_not_waited_for() -> None:
    records = [rec("a", 2, closed=True, s2=[0]), rec("b", 1, done=True, closed=True, s1=[0])]
    assert step_contents(records, 2) is not None
    assert step_contents([rec("a", 0, done=True)], 0) is None  # nobody contributed: nothing to apply


def test_a_replica_far_behind_is_told_to_download() -> None:
    with pytest.raises(Behind):
        step_contents([rec("a", 5)], 2)
    with pytest.raises(Behind):
        step_contents([rec("a", 3, s2=[0])], 1)  # past step 1 and nobody remembers it


def test_participants_and_the_step_a_newcomer_starts_at() -> None:
    records = [rec("a", 1, s0=[0]), rec("b", 0, closed=True, s0=[1]), rec("c", 2), rec("d", 0, done=True)]
    assert sorted(participants(records, 0)) == ["a", "b"]
    assert sorted(participants(records, 1)) == ["a", "b"]
    assert current_step(records) == 2
    assert current_step([], floor=5) == 5


def test_span_gradient_store_sums_only_declared_microbatches_and_clips() -> None:
    import torch

    from peer.server import BadRequestError, GradientStore
    from swarm.steps import StepContents

    like = [torch.nn.Parameter(torch.zeros(2, 2))]
    store = GradientStore(max_norm=1.0)
    store.add(0, ("a", 0), 8, [torch.full((2, 2), 0.1)])  # norm 0.2: kept as is
    store.add(0, ("a", 1), 8, [torch.full((2, 2), 10.0)])  # norm 20: clipped to 1
    store.add(0, ("b", 0), 8, [torch.full((2, 2), 5.0)])  # not declared: dropped
    with pytest.raises(BadRequestError, match="not finite"):
        store.add(0, ("a", 2), 8, [torch.full((2, 2), float("inf"))])
    sums, samples = store.take(StepContents(0, frozenset({("a", 0), ("a", 1)}), 16), like)
    assert samples == 16 and store.clipped == 2  # (a, 1) and the undeclared (b, 0)
    assert torch.allclose(sums[0], 8 * torch.full((2, 2), 0.1) + 8 * torch.full((2, 2), 0.5))
    assert store.take(StepContents(0, frozenset({("b", 0)}), 8), like)[1] == 0  # the step was dropped whole
