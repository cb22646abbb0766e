"""Sanity checks of one epoch's all-reduce among a span's replicas (pure; used by peer.replica_group).

Every replica tells the group, through hivemind's ``gather``, the L2 norm of the mean gradient it brings and
the samples it holds. Two checks follow, both true of any honest group (so they never refuse an honest epoch):

- **outliers**: a replica whose gradient norm is not finite, or more than ``factor`` times the median of the
  group's norms (needs 3+ replicas: with two, nobody can tell which one is off), is named;
- **consistency**: the norm of a weighted average is at most the weighted average of the norms (triangle
  inequality). A result above that bound means a member sent gradients larger than it declared, or returned a
  wrong average for its part of the all-reduce (hivemind splits the vector: each member averages one part).

Either way the replica does not apply the result. What is not caught here: a member that sends gradients of the
size it declares but of the wrong direction (sign-flipped, random). The coordinator's per-span replica vote at
finalize and the eval gate are the next line (SECURITY.md).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

OUTLIER_FACTOR = 10.0
MIN_GROUP_FOR_OUTLIERS = 3


def global_norm(tensors: Sequence[torch.Tensor]) -> float:
    """L2 norm of all ``tensors`` as one vector (float64 accumulation)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def outliers(
    norms: Mapping[str, float], weights: Mapping[str, float] | None = None, factor: float = OUTLIER_FACTOR
) -> dict[str, str]:
    """Peer id -> why its declared gradient norm is out of line with the group's.

    Only replicas that hold samples (``weights`` > 0; all when not given) count towards the median and can be
    named for their size: one that holds none contributes nothing to the average.
    """
    named = {p: f"declared gradient norm {n!r}" for p, n in norms.items() if not math.isfinite(n) or n < 0}
    holding = {p: n for p, n in norms.items() if p not in named and (weights is None or weights.get(p, 0) > 0)}
    if len(holding) >= MIN_GROUP_FOR_OUTLIERS:
        median = statistics.median(holding.values())
        for p, n in holding.items():
            if n > factor * median + 1e-12:
                named[p] = f"gradient norm {n:.3g} is {n / max(median, 1e-30):.0f}x the group's median {median:.3g}"
    return named


def exceeds_bound(
    average_norm: float, norms: Mapping[str, float], weights: Mapping[str, float], rel: float = 1e-3
) -> bool:
    """The averaged gradient is larger than any honest group's could be (see the module docstring)."""
    total = sum(weights.values())
    if not math.isfinite(average_norm):
        return True
    if total <= 0:
        return False
    bound = sum(weights[p] * norms[p] for p in norms) / total
    return average_norm > bound * (1 + rel) + 1e-7
