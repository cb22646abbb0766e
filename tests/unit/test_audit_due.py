"""Which epochs a replica audits (peer.replica_group.ReplicaGroup._audit_due): decided from the result, so that
replicas with the same result agree, at about ``audit_rate`` of epochs."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from peer.replica_group import GroupSettings, ReplicaGroup


def _due(rate: float, epoch: int, result: list[torch.Tensor]) -> bool:
    group = SimpleNamespace(settings=GroupSettings("run_span0-2", 1.0, 30.0, audit_rate=rate))
    return ReplicaGroup._audit_due(group, epoch, result)  # type: ignore[arg-type]


def test_audits_about_the_rate_of_epochs_and_the_same_ones_for_the_same_result() -> None:
    g = torch.Generator().manual_seed(0)
    results = [[torch.randn(16, 8, generator=g)] for _ in range(800)]
    due = [_due(0.125, e, r) for e, r in enumerate(results)]
    assert 60 <= sum(due) <= 140, sum(due)
    # a replica whose result differs by float rounding (another part order in the all-reduce) audits the same epochs
    again = [_due(0.125, e, [r[0] * (1 + 1e-7)]) for e, r in enumerate(results)]
    assert sum(a != b for a, b in zip(due, again, strict=True)) <= 4
    assert not any(_due(0.0, e, r) for e, r in enumerate(results[:50]))
    assert all(_due(1.0, e, r) for e, r in enumerate(results[:50]))
