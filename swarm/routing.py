"""Throughput-weighted choice among a span's replicas, with failover (pure functions, no sockets)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


class _SpanLike(Protocol):
    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


SpanT = TypeVar("SpanT", bound=_SpanLike)


@dataclass(frozen=True)
class Replica:
    """A server of one span, as the router sees it."""

    peer_id: str
    throughput: float


#: Announced throughput is self-declared: weights are capped so that no server draws all the traffic by claiming more.
MAX_THROUGHPUT = 1e4
#: ... and at this multiple of the median replica's: a boaster cannot hold all of a step's samples, which would leave
#: the all-reduce's per-replica checks (swarm.sanity, 3+ replicas holding samples) nothing to compare it with.
MAX_SHARE_OF_MEDIAN = 4.0


class NoReplicaError(RuntimeError):
    """No live server for a span: the trainer should wait and retry."""


def routing_weights(replicas: Sequence[Replica]) -> list[float]:
    """Each replica's share of the traffic: its throughput, finite and capped (``MAX_THROUGHPUT``, and with 3+
    replicas ``MAX_SHARE_OF_MEDIAN`` times the median one); zero-throughput replicas only when all are."""
    weights = [
        min(r.throughput, MAX_THROUGHPUT) if math.isfinite(r.throughput) and r.throughput > 0 else 0.0 for r in replicas
    ]
    positive = sorted(w for w in weights if w > 0)
    if len(positive) >= 3:
        cap = MAX_SHARE_OF_MEDIAN * positive[len(positive) // 2]
        weights = [min(w, cap) for w in weights]
    if sum(weights) <= 0:
        weights = [1.0] * len(replicas)
    return weights


class RoundRobin:
    """Smooth weighted round-robin over a span's replicas (nginx's algorithm), one per span and trainer.

    Over any run of picks each replica gets its share of :func:`routing_weights` to within one pick, in an
    interleaved order: a step of n micro-batches reaches every replica whose share is at least 1/n, so the
    all-reduce's per-replica checks (``swarm.sanity``: 3+ replicas holding samples) have something to compare.
    Random choice left whole steps with one or two holders. Not thread-safe: the router holds its lock.
    """

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def pick(self, replicas: Sequence[Replica], exclude: Iterable[str] = ()) -> Replica:
        """The next replica; ``exclude`` names peers that just failed."""
        excluded = set(exclude)
        live = [r for r in replicas if r.peer_id not in excluded]
        if not live:
            raise NoReplicaError("no live replica left for this span")
        weights = routing_weights(live)
        self.current = {r.peer_id: self.current.get(r.peer_id, 0.0) + w for r, w in zip(live, weights, strict=True)}
        best = max(live, key=lambda r: (self.current[r.peer_id], r.peer_id))
        self.current[best.peer_id] -= sum(weights)
        return best


def least_served_span(spans: Sequence[SpanT], served: Iterable[tuple[tuple[int, int], float]]) -> SpanT:
    """The span that most needs capacity: no server first, then lowest summed throughput, then fewest replicas.

    ``served`` lists ``((start, end), throughput)`` of live servers. Ties go to the lowest span index.
    """
    totals: dict[tuple[int, int], list[float]] = {}
    for key, throughput in served:
        totals.setdefault(key, []).append(max(throughput, 0.0))

    def need(i: int) -> tuple[bool, float, int, int]:
        got = totals.get((spans[i].start, spans[i].end), [])
        return (bool(got), sum(got), len(got), i)

    return spans[min(range(len(spans)), key=need)]
