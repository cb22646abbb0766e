"""Span assignment and rebalancing as pure functions over live replicas.

A span's *coverage* is the summed throughput of its live replicas. A joining peer takes the
span that needs capacity most; when a span loses its last server, a peer moves there from the
best-covered span that can spare one (petals' block selection, reduced to whole spans). A replica may be limited
to some spans (``allowed``: the span a volunteer chose, or the spans that fit its memory); it is never moved
elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Replica:
    """A live peer serving span ``span_index`` at ``throughput`` (0 = not measured yet)."""

    peer_id: str
    span_index: int
    throughput: float
    allowed: frozenset[int] | None = None  # spans it may host (None = any)

    def may_host(self, span_index: int) -> bool:
        return self.allowed is None or span_index in self.allowed


@dataclass(frozen=True)
class Move:
    peer_id: str
    from_span: int
    to_span: int


@dataclass(frozen=True)
class SpanLoad:
    span_index: int
    replicas: int
    throughput: float


def span_loads(replicas: Iterable[Replica], num_spans: int) -> list[SpanLoad]:
    """Live replica count and summed throughput per span (replicas outside ``[0, num_spans)`` ignored)."""
    counts = [0] * num_spans
    totals = [0.0] * num_spans
    for r in replicas:
        if 0 <= r.span_index < num_spans:
            counts[r.span_index] += 1
            totals[r.span_index] += r.throughput
    return [SpanLoad(i, counts[i], totals[i]) for i in range(num_spans)]


def choose_span(replicas: Iterable[Replica], num_spans: int, allowed: Iterable[int] | None = None) -> int:
    """The span a new peer should host, among ``allowed`` (default: every span).

    Uncovered spans first, then the lowest summed throughput; ties go to fewer replicas (so
    peers that have not measured their throughput yet still spread out), then the lowest index.
    """
    if num_spans <= 0:
        raise ValueError(f"num_spans must be > 0, got {num_spans}")
    candidates = set(range(num_spans)) if allowed is None else set(allowed) & set(range(num_spans))
    if not candidates:
        raise ValueError("no span is allowed")
    loads = [s for s in span_loads(replicas, num_spans) if s.span_index in candidates]
    best = min(loads, key=lambda s: (s.replicas > 0, s.throughput, s.replicas, s.span_index))
    return best.span_index


def rebalance(replicas: Sequence[Replica], num_spans: int) -> list[Move]:
    """Moves that give every uncovered span a server, taken from spans that can spare one.

    For each span without a live replica (lowest index first), the donor is the best-covered
    span (highest summed throughput, then most replicas, then lowest index) among spans with at
    least two replicas and one that may host the target; its slowest such replica moves (ties:
    smallest peer id). Spans stay uncovered when no span has a replica to spare. Returns ``[]``
    when every span is covered.
    """
    placed = {r.peer_id: r for r in replicas if 0 <= r.span_index < num_spans}
    moves: list[Move] = []
    for target in range(num_spans):
        loads = span_loads(placed.values(), num_spans)
        if loads[target].replicas > 0:
            continue
        movable = [r for r in placed.values() if r.may_host(target)]
        donors = [s for s in loads if s.replicas >= 2 and any(r.span_index == s.span_index for r in movable)]
        if not donors:
            continue  # nothing to spare for this span now
        donor = min(donors, key=lambda s: (-s.throughput, -s.replicas, s.span_index))
        mover = min(
            (r for r in movable if r.span_index == donor.span_index),
            key=lambda r: (r.throughput, r.peer_id),
        )
        moves.append(Move(mover.peer_id, donor.span_index, target))
        placed[mover.peer_id] = Replica(mover.peer_id, target, mover.throughput, mover.allowed)
    return moves
