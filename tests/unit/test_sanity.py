"""All-reduce sanity checks: honest groups always pass; inflated, non-finite or inconsistent ones do not."""

from __future__ import annotations

import math

import pytest
import torch

from swarm.sanity import (
    SKETCH_TOLERANCE,
    against_the_group,
    exceeds_bound,
    global_norm,
    outliers,
    sketch,
    sketch_mismatch,
)

pytestmark = pytest.mark.timeout(30)


def _group(n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(8, 4, generator=g), torch.randn(4, 8, generator=g)]
    return [[b + 0.5 * torch.randn(b.shape, generator=g) for b in base] for _ in range(n)]


def _average(grads: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    total = sum(weights)
    return [sum(w * g[i] for g, w in zip(grads, weights, strict=True)) / total for i in range(len(grads[0]))]


@pytest.mark.parametrize("seed", range(20))
def test_honest_groups_always_pass(seed: int) -> None:
    grads = _group(3, seed)
    weights = [8.0, 16.0, 8.0 * (seed % 3)]
    norms = {f"p{i}": global_norm(g) for i, g in enumerate(grads)}
    assert outliers(norms) == {}
    average = _average(grads, weights)
    assert not exceeds_bound(global_norm(average), norms, dict(zip(norms, weights, strict=True)))
    sketches = {p: sketch(g, seed) for p, g in zip(norms, grads, strict=True)}
    assert against_the_group(sketches, dict(zip(norms, weights, strict=True))) == {}
    assert sketch_mismatch(sketch(average, seed), sketches, dict(zip(norms, weights, strict=True))) < 1e-6


@pytest.mark.parametrize("seed", range(20))
def test_noisy_honest_groups_are_not_named_for_their_direction(seed: int) -> None:
    """Gradients with no shared direction (pure noise): nobody agrees, so nobody is named."""
    g = torch.Generator().manual_seed(seed)
    grads = {f"p{i}": [torch.randn(64, 32, generator=g)] for i in range(4)}
    assert against_the_group({p: sketch(t, seed) for p, t in grads.items()}, dict.fromkeys(grads, 8.0)) == {}


def test_a_sign_flipped_gradient_is_named_and_a_lie_about_it_shows_in_the_result() -> None:
    grads = _group(3)
    flipped = [-t for t in grads[2]]
    weights = {"p0": 8.0, "p1": 8.0, "p2": 8.0}
    sketches = {"p0": sketch(grads[0], 7), "p1": sketch(grads[1], 7), "p2": sketch(flipped, 7)}
    named = against_the_group(sketches, weights)
    assert list(named) == ["p2"] and "against the group" in named["p2"]
    assert against_the_group(sketches, {**weights, "p2": 0.0}) == {}  # holds no samples: contributes nothing
    # declared honest, sent flipped: the result's sketch is not the average of the declared ones
    honest = {**sketches, "p2": sketch(grads[2], 7)}
    result = sketch(_average([grads[0], grads[1], flipped], [8.0, 8.0, 8.0]), 7)
    assert sketch_mismatch(result, honest, weights) > 100 * SKETCH_TOLERANCE
    assert sketch_mismatch(result, sketches, weights) < 1e-6  # what was declared is what was sent


def test_a_sketch_keeps_inner_products() -> None:
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(256, 64, generator=g)]
    b = [0.6 * a[0] + 0.8 * torch.randn(256, 64, generator=g)]
    exact = float((a[0] * b[0]).sum() / (a[0].norm() * b[0].norm()))
    sa, sb = sketch(a, 3), sketch(b, 3)
    assert abs(float(sa @ sb / (sa.norm() * sb.norm())) - exact) < 0.15
    assert torch.equal(sketch(a, 3), sa) and not torch.equal(sketch(a, 4), sa)  # seeded


def test_a_replica_that_declares_an_inflated_gradient_is_named() -> None:
    grads = _group(3)
    grads[2] = [100 * t for t in grads[2]]
    norms = {f"p{i}": global_norm(g) for i, g in enumerate(grads)}
    assert list(outliers(norms)) == ["p2"] and "x the group's median" in outliers(norms)["p2"]
    assert list(outliers({"a": 1.0, "b": math.nan, "c": 1.0})) == ["b"]
    assert outliers({"a": 1.0, "b": 100.0}) == {}  # two replicas: nobody can tell which one is off
    # replicas that hold no samples neither set the median nor get named for their size
    assert outliers({"a": 0.0, "b": 0.0, "c": 1.0}, {"a": 0, "b": 0, "c": 8}) == {}
    assert list(outliers({"a": 1.0, "b": 1.1, "c": 0.9, "d": 50.0}, {"a": 8, "b": 8, "c": 8, "d": 8})) == ["d"]


@pytest.mark.parametrize("lie", ["inflated gradients", "wrong average for its part"])
def test_a_result_above_the_declared_norms_is_refused(lie: str) -> None:
    grads = _group(3)
    weights = {"p0": 8.0, "p1": 8.0, "p2": 8.0}
    norms = {f"p{i}": global_norm(g) for i, g in enumerate(grads)}  # p2 declares its honest norm
    if lie == "inflated gradients":
        grads[2] = [100 * t for t in grads[2]]
        average = _average(grads, list(weights.values()))
    else:
        average = _average(grads, list(weights.values()))
        average[1] = average[1] + 50.0  # the part p2 averaged comes back wrong
    assert exceeds_bound(global_norm(average), norms, weights)
    assert exceeds_bound(math.nan, norms, weights)
