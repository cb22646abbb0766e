"""Routing and span choice: smooth weighted round-robin by throughput (bounded), failed peers excluded."""

from __future__ import annotations

from collections import Counter

import pytest

from swarm.config import SpanRange, split_even
from swarm.routing import NoReplicaError, Replica, RoundRobin, least_served_span


def picks(replicas: list[Replica], n: int, **kw: object) -> Counter[str]:
    rotation = RoundRobin()
    return Counter(rotation.pick(replicas, **kw).peer_id for _ in range(n))  # type: ignore[arg-type]


def test_non_finite_or_absurd_throughput_neither_breaks_nor_captures_routing() -> None:
    replicas = [Replica("inf", float("inf")), Replica("nan", float("nan")), Replica("huge", 1e300), Replica("ok", 50.0)]
    counts = picks(replicas, 2000)
    assert counts["inf"] == counts["nan"] == 0
    assert counts["ok"] > 0, "a self-declared huge throughput must not draw all the traffic"


def test_weighted_by_throughput_exactly_and_interleaved() -> None:
    replicas = [Replica("fast", 90.0), Replica("slow", 10.0)]
    assert picks(replicas, 100) == {"fast": 90, "slow": 10}
    rotation = RoundRobin()
    order = [rotation.pick([Replica("a", 2.0), Replica("b", 1.0), Replica("c", 1.0)]).peer_id for _ in range(4)]
    assert sorted(order) == ["a", "a", "b", "c"] and order[0] != order[1]  # every replica within one round


def test_failed_peers_excluded_and_empty_raises() -> None:
    replicas = [Replica("a", 5.0), Replica("b", 5.0)]
    assert set(picks(replicas, 20, exclude={"a"})) == {"b"}
    with pytest.raises(NoReplicaError, match="no live replica"):
        RoundRobin().pick(replicas, exclude={"a", "b"})


def test_zero_throughput_still_usable() -> None:
    assert RoundRobin().pick([Replica("z", 0.0)]).peer_id == "z"


def test_least_served_span() -> None:
    spans = split_even(6, 3)
    assert spans == (SpanRange(start=0, end=2), SpanRange(start=2, end=4), SpanRange(start=4, end=6))
    assert least_served_span(spans, []) == spans[0]
    assert least_served_span(spans, [((0, 2), 5.0), ((2, 4), 1.0)]) == spans[2]  # no server beats slow server
    assert least_served_span(spans, [((0, 2), 5.0), ((2, 4), 1.0), ((4, 6), 3.0)]) == spans[1]
    # equal throughput: fewer replicas first
    assert least_served_span(spans[:2], [((0, 2), 1.0), ((0, 2), 1.0), ((2, 4), 2.0)]) == spans[1]


def test_a_boaster_among_three_gets_at_most_four_times_the_median_share() -> None:
    replicas = [Replica("a", 10.0), Replica("b", 12.0), Replica("boaster", 5000.0)]
    assert picks(replicas, 70) == {"a": 10, "b": 12, "boaster": 48}  # capped at 4x the median 12
    assert len(picks(replicas, 7)) == 3  # a step of 7 micro-batches reaches all three
