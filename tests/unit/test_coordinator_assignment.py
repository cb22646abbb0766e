"""Span choice on join and rebalancing when a span loses its last server (pure functions)."""

from __future__ import annotations

import pytest

from coordinator.assignment import Move, Replica, choose_span, rebalance, span_loads

pytestmark = pytest.mark.timeout(10)


def R(peer: str, span: int, tput: float = 1.0) -> Replica:
    return Replica(peer, span, tput)


def test_first_peers_fill_spans_in_order() -> None:
    replicas: list[Replica] = []
    for i in range(3):
        span = choose_span(replicas, 3)
        assert span == i
        replicas.append(R(f"p{i}", span, 0.0))  # unmeasured throughput still spreads peers out


def test_join_picks_lowest_summed_throughput() -> None:
    replicas = [R("a", 0, 10), R("b", 1, 3), R("c", 1, 3), R("d", 2, 5)]
    assert choose_span(replicas, 3) == 2  # 10, 6, 5 -> span 2
    assert choose_span([R("a", 0, 2), R("b", 1, 2)], 2) == 0  # tie -> lowest index


def test_join_prefers_uncovered_span_even_when_others_are_slow() -> None:
    assert choose_span([R("a", 0, 0.0), R("b", 1, 0.0)], 3) == 2


def test_choose_span_rejects_empty_round() -> None:
    with pytest.raises(ValueError, match="num_spans"):
        choose_span([], 0)


def test_span_loads_ignores_replicas_outside_the_round() -> None:
    loads = span_loads([R("a", 0, 2), R("b", 5, 9)], 2)
    assert [(s.replicas, s.throughput) for s in loads] == [(1, 2.0), (0, 0.0)]


def test_rebalance_nothing_to_do_when_covered() -> None:
    assert rebalance([R("a", 0), R("b", 1)], 2) == []


def test_rebalance_moves_slowest_peer_of_best_covered_span() -> None:
    replicas = [R("a", 0, 5), R("b", 0, 1), R("c", 1, 4), R("d", 1, 4), R("e", 1, 3)]
    # span 2 lost its last server; span 1 (11) is best covered; its slowest is e
    assert rebalance(replicas, 3) == [Move("e", 1, 2)]


def test_rebalance_never_uncovers_a_span() -> None:
    assert rebalance([R("a", 0, 100), R("b", 1, 1)], 3) == []  # nobody can be spared


def test_rebalance_several_holes_in_index_order() -> None:
    replicas = [R("a", 0, 4), R("b", 0, 3), R("c", 0, 2), R("d", 0, 1)]
    moves = rebalance(replicas, 3)
    assert moves == [Move("d", 0, 1), Move("c", 0, 2)]
    after = {m.peer_id: m.to_span for m in moves}
    placed = [R(r.peer_id, after.get(r.peer_id, r.span_index), r.throughput) for r in replicas]
    assert all(s.replicas > 0 for s in span_loads(placed, 3))


def test_rebalance_ties_break_on_peer_id() -> None:
    assert rebalance([R("z", 0, 1), R("y", 0, 1)], 2) == [Move("y", 0, 1)]


def test_choose_span_only_among_allowed_spans() -> None:
    assert choose_span([], 3, allowed=[1, 2]) == 1  # span 0 is uncovered but does not fit this peer
    assert choose_span([R("a", 1, 1.0)], 3, allowed=[1, 2]) == 2
    with pytest.raises(ValueError, match="no span is allowed"):
        choose_span([], 3, allowed=[5])


def test_rebalance_never_moves_a_replica_to_a_span_it_may_not_host() -> None:
    pinned = Replica("a", 0, 1.0, frozenset({0}))  # chose span 0 itself
    small = Replica("b", 0, 1.0, frozenset({0}))  # only span 0 fits its memory
    assert rebalance([pinned, small], 2) == []  # span 1 stays uncovered rather than break a volunteer's choice
    free = Replica("c", 0, 5.0)
    assert rebalance([pinned, small, free], 2) == [Move("c", 0, 1)]  # the one that may move does, though faster
    # a later hole can still be filled when an earlier one cannot
    assert rebalance([Replica("d", 0, 1.0, frozenset({0, 2})), R("e", 0)], 3) == [Move("e", 0, 1)]
    assert rebalance([Replica("d", 0, 1.0, frozenset({0, 2})), Replica("e", 0, 1.0, frozenset({0, 2}))], 3) == [
        Move("d", 0, 2)
    ]
