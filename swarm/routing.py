"""Throughput-weighted choice among a span's replicas, with failover (pure functions, no sockets)."""

from __future__ import annotations

import math
import random
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


class NoReplicaError(RuntimeError):
    """No live server for a span: the trainer should wait and retry."""


def choose_replica(
    replicas: Sequence[Replica],
    exclude: Iterable[str] = (),
    rng: random.Random | None = None,
) -> Replica:
    """Pick a replica at random with probability proportional to throughput (the trainer runs its own spans).

    ``exclude`` names peers that just failed. Zero-throughput replicas are picked only if nothing else is left.
    """
    excluded = set(exclude)
    live = [r for r in replicas if r.peer_id not in excluded]
    if not live:
        raise NoReplicaError("no live replica left for this span")
    weights = [
        min(r.throughput, MAX_THROUGHPUT) if math.isfinite(r.throughput) and r.throughput > 0 else 0.0 for r in live
    ]
    if sum(weights) <= 0:
        weights = [1.0] * len(live)
    return (rng or random).choices(live, weights=weights, k=1)[0]


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
