"""Throughput-weighted choice among a span's replicas, with failover (pure functions, no sockets)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Replica:
    """A server of one span, as the router sees it."""

    peer_id: str
    throughput: float
    local: bool = False


class NoReplicaError(RuntimeError):
    """No live server for a span: the trainer should wait and retry."""


def choose_replica(replicas: Sequence[Replica], exclude: Iterable[str] = (), rng: random.Random | None = None,
                   prefer_local: bool = True) -> Replica:
    """Pick a replica: the local one if allowed, else at random with probability proportional to throughput.

    ``exclude`` names peers that just failed. Zero-throughput replicas are picked only if nothing else is left.
    """
    excluded = set(exclude)
    live = [r for r in replicas if r.peer_id not in excluded]
    if not live:
        raise NoReplicaError("no live replica left for this span")
    if prefer_local:
        for r in live:
            if r.local:
                return r
    weights = [max(r.throughput, 0.0) for r in live]
    if sum(weights) <= 0:
        weights = [1.0] * len(live)
    return (rng or random).choices(live, weights=weights, k=1)[0]
