"""Routing and span choice are pure functions: throughput-weighted (bounded), failed peers excluded."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from swarm.config import SpanRange, split_even
from swarm.routing import NoReplicaError, Replica, choose_replica, least_served_span


def test_non_finite_or_absurd_throughput_neither_breaks_nor_captures_routing() -> None:
    rng = random.Random(0)
    replicas = [Replica("inf", float("inf")), Replica("nan", float("nan")), Replica("huge", 1e300), Replica("ok", 50.0)]
    counts = Counter(choose_replica(replicas, rng=rng).peer_id for _ in range(2000))
    assert counts["inf"] == counts["nan"] == 0
    assert counts["ok"] > 0, "a self-declared huge throughput must not draw all the traffic"


def test_weighted_by_throughput() -> None:
    rng = random.Random(0)
    replicas = [Replica("fast", 90.0), Replica("slow", 10.0)]
    counts = Counter(choose_replica(replicas, rng=rng).peer_id for _ in range(2000))
    assert 0.85 < counts["fast"] / 2000 < 0.95


def test_failed_peers_excluded_and_empty_raises() -> None:
    replicas = [Replica("a", 5.0), Replica("b", 5.0)]
    assert {choose_replica(replicas, exclude={"a"}).peer_id for _ in range(20)} == {"b"}
    with pytest.raises(NoReplicaError, match="no live replica"):
        choose_replica(replicas, exclude={"a", "b"})


def test_zero_throughput_still_usable() -> None:
    assert choose_replica([Replica("z", 0.0)]).peer_id == "z"


def test_least_served_span() -> None:
    spans = split_even(6, 3)
    assert spans == (SpanRange(start=0, end=2), SpanRange(start=2, end=4), SpanRange(start=4, end=6))
    assert least_served_span(spans, []) == spans[0]
    assert least_served_span(spans, [((0, 2), 5.0), ((2, 4), 1.0)]) == spans[2]  # no server beats slow server
    assert least_served_span(spans, [((0, 2), 5.0), ((2, 4), 1.0), ((4, 6), 3.0)]) == spans[1]
    # equal throughput: fewer replicas first
    assert least_served_span(spans[:2], [((0, 2), 1.0), ((0, 2), 1.0), ((2, 4), 2.0)]) == spans[1]
