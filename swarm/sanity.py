"""Sanity checks of one epoch's all-reduce among a span's replicas (pure; used by peer.replica_group).

Every replica tells the group, through hivemind's ``gather``, the L2 norm of the mean gradient it brings and
the samples it holds. Two checks follow, both true of any honest group (so they never refuse an honest epoch):

- **outliers**: a replica whose gradient norm is not finite, or more than ``factor`` times the median of the
  group's norms (needs 3+ replicas: with two, nobody can tell which one is off), is named;
- **consistency**: the norm of a weighted average is at most the weighted average of the norms (triangle
  inequality). A result above that bound means a member sent gradients larger than it declared, or returned a
  wrong average for its part of the all-reduce (hivemind splits the vector: each member averages one part).

Every replica also declares a **sketch** of its gradient: a count sketch (each coordinate added, with a random
sign, to one of ``SKETCH_SIZE`` buckets; seeded by the run and epoch) that keeps inner products in expectation.
Two more checks follow:

- **direction**: a replica whose sketch points against the others' (cosine <= -``AGREEMENT``) while the others
  agree among themselves (cosine >= ``AGREEMENT``) is named: a sign-flipped gradient (needs 3+ replicas);
- **sketch consistency**: sketches are linear, so the sketch of the averaged result must equal the weighted
  average of the declared sketches (up to float rounding). Any other result means a member sent something other
  than what it declared, or returned a wrong average for its part, whatever its size.

Either way the replica does not apply the result; after an inconsistent one it asks the members to show the
gradients they brought and recomputes the average itself (``peer.replica_group.ReplicaGroup.recompute``). What
is not caught here: a gradient of a random direction
(cosine near 0: not named), and an adaptive attacker that knows the sketch's seed (it is public) and shapes what
it sends so that its sketch looks honest. The coordinator's per-span replica vote at finalize and the eval gate
are the next line (SECURITY.md).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Mapping, Sequence

import torch

OUTLIER_FACTOR = 10.0
MIN_GROUP_FOR_OUTLIERS = 3
#: buckets of a gradient sketch (floats each replica declares per epoch)
SKETCH_SIZE = 256
#: how much the others must agree, and a member point against them, to name it for its direction
AGREEMENT = 0.2
#: relative distance between a result's sketch and the declared ones above which the result is refused
SKETCH_TOLERANCE = 1e-3


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


def sketch_seed(run_id: str, epoch: int) -> int:
    """The seed of an epoch's sketches: the same on every replica of the span."""
    return int.from_bytes(hashlib.sha256(f"{run_id}/{epoch}".encode()).digest()[:8], "big") >> 1


def sketch(tensors: Sequence[torch.Tensor], seed: int, size: int = SKETCH_SIZE) -> torch.Tensor:
    """Count sketch (float64, ``size`` buckets) of ``tensors`` as one vector; linear in the tensors."""
    out = torch.zeros(size, dtype=torch.float64)
    for k, t in enumerate(tensors):
        flat = t.detach().reshape(-1).to("cpu", torch.float64)
        g = torch.Generator().manual_seed((seed + k * 0x9E3779B97F4A7C15) % (1 << 63))
        buckets = torch.randint(size, (flat.numel(),), generator=g)
        signs = torch.randint(2, (flat.numel(),), generator=g, dtype=torch.int8).to(torch.float64) * 2 - 1
        out.index_add_(0, buckets, flat * signs)
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


def against_the_group(
    sketches: Mapping[str, torch.Tensor], weights: Mapping[str, float], agreement: float = AGREEMENT
) -> dict[str, str]:
    """Peer id -> why: its gradient points against the others', which agree among themselves (3+ holding)."""
    holding = {p: s for p, s in sketches.items() if weights.get(p, 0) > 0}
    named: dict[str, str] = {}
    if len(holding) < MIN_GROUP_FOR_OUTLIERS:
        return named
    for p, mine in holding.items():
        others = [s for q, s in holding.items() if q != p]
        agree = statistics.median(_cos(a, b) for i, a in enumerate(others) for b in others[i + 1 :])
        against = _cos(mine, sum(others, torch.zeros_like(mine)))
        if agree >= agreement and against <= -agreement:
            named[p] = f"gradient points against the group's (cosine {against:.2f}; the others agree at {agree:.2f})"
    return named


def sketch_mismatch(result: torch.Tensor, sketches: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> float:
    """How far the result's sketch is from the weighted average of the declared ones, relative to their size
    (0 for an honest group up to float rounding; a result is refused above ``SKETCH_TOLERANCE``)."""
    total = sum(weights.values())
    if total <= 0:
        return 0.0
    expected = sum((sketches[p] * (weights[p] / total) for p in sketches), torch.zeros_like(result))
    scale = sum(float(sketches[p].norm()) * weights[p] / total for p in sketches)
    return float((result - expected).norm()) / max(scale, 1e-12)
