"""Finalizing a round on Memory and Sqlite stores: replicas, NaN, missing spans, eval gating, timeouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.finalize import FinalizeError, Outcome, collect, decide
from coordinator.publish import finalize_step
from coordinator.state import EvalReport, MemberRecord, RoundRecord, SpanStateUpload
from swarm.adapter import load_adapter_tensors
from swarm.proto import RoundState
from tests.unit.finalize_helpers import SPEC, Swarm, span_state

pytestmark = pytest.mark.timeout(30)
TWO = {"a": 0, "b": 1}


@pytest.fixture(params=["memory", "sqlite"])
def swarm(request: pytest.FixtureRequest, tmp_path: Path) -> Swarm:
    return Swarm(tmp_path, store=request.param)


def outcomes(s: Swarm) -> dict[str, float]:
    sample = s.ctx.metrics.registry.get_sample_value
    return {o.value: sample("swarm_coordinator_finalize_total", {"outcome": o.value}) or 0 for o in Outcome}


def test_agreeing_replicas_publish_a_signed_adapter(swarm: Swarm) -> None:
    swarm.train({"a": 0, "b": 1, "c": 0}, before={"a": 3.0, "b": 2.0})
    swarm.upload("a", 0, span_state(0))
    assert finalize_step(swarm.ctx, swarm.key) is None  # b and c have not uploaded, no final eval yet
    swarm.upload("c", 0, {k: v + 1e-7 for k, v in span_state(0).items()})  # within atol: agrees
    swarm.upload("b", 1, span_state(1))
    swarm.report("a", 3, 2.5, tokens=100)
    assert finalize_step(swarm.ctx, swarm.key) is None  # b reported a starting eval: wait for its final one
    swarm.report("b", 3, 1.0, tokens=300)
    assert finalize_step(swarm.ctx, swarm.key) is Outcome.PUBLISHED
    record = swarm.ctx.store.get_round("r1")
    assert record is not None and record.state is RoundState.PUBLISHED and record.reason == "published v1"
    [adapter] = swarm.ctx.store.list_adapters()
    assert (adapter.version, adapter.parents, adapter.round_id) == ("v1", (), "r1")
    manifest, tensors = load_adapter_tensors(adapter.path, swarm.key.public_key())
    assert manifest.eval_loss_before == pytest.approx(2.5) and manifest.eval_loss_after == pytest.approx(1.375)
    assert (manifest.method, manifest.parent_version, manifest.base_fingerprint) == ("round", None, "sha256:tiny")
    assert {(c.peer_id, c.samples, c.tokens) for c in manifest.contributors} == {(p, 5, 320) for p in "abc"}
    for k, v in {**span_state(0), **span_state(1)}.items():
        assert torch.equal(tensors[k], v)
    assert Path(adapter.path) == swarm.config.adapters_dir / "v1"
    assert outcomes(swarm)["published"] == 1 and swarm.beat("a", 5, 3).action == "stop"


def test_disagreeing_replicas_majority_wins_and_is_recorded(swarm: Swarm) -> None:
    swarm.train({"a": 0, "b": 1, "c": 0, "d": 1, "e": 0}, before={"a": 3.0})
    good, bad = span_state(0), span_state(0, seed=9)
    swarm.upload("a", 0, bad, samples=50)  # alone, even with the most samples
    swarm.upload("c", 0, good)
    swarm.upload("e", 0, good)
    swarm.upload("b", 1, span_state(1), samples=4)  # a 1-1 tie on span 1: more samples wins
    swarm.upload("d", 1, span_state(1, seed=9), samples=6)
    swarm.report("a", 3, 2.0)
    assert finalize_step(swarm.ctx, swarm.key) is Outcome.PUBLISHED
    record = swarm.ctx.store.get_round("r1")
    assert record is not None and "kept c, e, outvoted a" in record.reason and "kept d, outvoted b" in record.reason
    _, tensors = load_adapter_tensors(swarm.config.adapters_dir / "v1", swarm.key.public_key())
    assert all(torch.equal(tensors[k], v) for k, v in {**good, **span_state(1, seed=9)}.items())
    assert swarm.ctx.metrics.registry.get_sample_value("swarm_coordinator_replica_disagreements_total") == 2


def test_nan_replica_is_set_aside_and_an_all_nan_span_fails(tmp_path: Path) -> None:
    nan = span_state(1)
    nan[next(iter(nan))][0, 0] = float("nan")
    ok = Swarm(tmp_path / "ok")
    ok.train({"a": 0, "b": 1, "c": 0, "d": 1}, before={"a": 3.0})
    ok.upload("a", 0, span_state(0))
    ok.upload("c", 0, span_state(0))
    ok.upload("b", 1, nan)
    ok.upload("d", 1, span_state(1))
    ok.report("a", 3, 2.0)
    assert finalize_step(ok.ctx, ok.key) is Outcome.PUBLISHED
    assert "b's upload holds NaN/Inf, set aside" in ok.ctx.store.get_round("r1").reason  # type: ignore[union-attr]

    bad = Swarm(tmp_path / "bad", store="sqlite")
    bad.train(TWO, before={"a": 3.0})
    bad.upload("a", 0, span_state(0))
    bad.upload("b", 1, nan)
    bad.report("a", 3, 2.0)
    assert finalize_step(bad.ctx, bad.key) is Outcome.NONFINITE
    record = bad.ctx.store.get_round("r1")
    assert record is not None and record.state is RoundState.FAILED
    assert record.reason.startswith("nonfinite: span 1-2: every upload holds NaN/Inf")
    assert bad.ctx.store.list_adapters() == [] and not bad.config.adapters_dir.exists()


def test_missing_span_waits_then_fails_at_the_timeout(swarm: Swarm) -> None:
    swarm.train(TWO, before={"a": 3.0})
    swarm.upload("a", 0, span_state(0))
    swarm.report("a", 3, 2.0)
    assert finalize_step(swarm.ctx, swarm.key) is None
    swarm.clock.now += 29
    assert finalize_step(swarm.ctx, swarm.key) is None
    swarm.clock.now += 2
    assert finalize_step(swarm.ctx, swarm.key) is Outcome.MISSING_SPAN
    record = swarm.ctx.store.get_round("r1")
    assert record is not None and record.state is RoundState.FAILED and "span 1-2 (epoch 3)" in record.reason
    assert outcomes(swarm)["missing_span"] == 1


def test_worse_than_parent_is_refused(swarm: Swarm) -> None:
    swarm.train(TWO, before={"a": 2.0, "b": 2.0})
    swarm.upload("a", 0, span_state(0))
    swarm.upload("b", 1, span_state(1))
    swarm.report("a", 3, 1.5)
    swarm.report("b", 3, 2.6)  # token-weighted mean 2.05 >= 2.0
    assert finalize_step(swarm.ctx, swarm.key) is Outcome.WORSE_THAN_PARENT
    record = swarm.ctx.store.get_round("r1")
    assert record is not None and record.state is RoundState.FAILED and "2.05 is not below" in record.reason
    assert swarm.ctx.store.list_adapters() == [] and outcomes(swarm)["worse_than_parent"] == 1


def test_without_a_starting_eval_nothing_is_published(swarm: Swarm) -> None:
    swarm.train(TWO, before={})
    swarm.upload("a", 0, span_state(0))
    swarm.upload("b", 1, span_state(1))
    swarm.report("a", 3, 1.5)
    assert finalize_step(swarm.ctx, swarm.key) is Outcome.NO_EVAL
    assert "ReportEval epoch 0" in swarm.ctx.store.get_round("r1").reason  # type: ignore[union-attr]


def test_timeout_goes_with_a_minimal_set_and_stale_epochs_are_ignored(tmp_path: Path) -> None:
    s = Swarm(tmp_path)
    s.train({"a": 0, "b": 1, "c": 0}, before={"a": 3.0, "c": 3.0})
    s.upload("a", 0, span_state(0))
    s.upload("b", 1, span_state(1))
    s.upload("c", 0, span_state(0, seed=5), epoch=2)  # a lagging replica: older epoch, ignored
    s.report("a", 3, 2.0)
    assert finalize_step(s.ctx, s.key) is None  # c is live and owes a final eval
    s.clock.now += 31
    assert finalize_step(s.ctx, s.key) is Outcome.PUBLISHED
    _, tensors = load_adapter_tensors(s.config.adapters_dir / "v1", s.key.public_key())
    assert all(torch.equal(tensors[k], v) for k, v in span_state(0).items())


def test_collect_and_decide_as_pure_functions() -> None:
    record = RoundRecord("r1", SPEC.to_json(), RoundState.FINALIZING, 0.0, 1.0, 10.0)
    members = [MemberRecord("r1", "a", 0, epoch=4), MemberRecord("r1", "b", 1, epoch=4)]
    uploads = [
        SpanStateUpload("r1", "a", 0, 4, "x", "h", 1, 1, 11.0),
        SpanStateUpload("r1", "b", 1, 3, "y", "h", 1, 1, 11.0),
    ]
    reports = [EvalReport("r1", "a", "", 0, 3.0, 10, 5.0), EvalReport("r1", "a", "", 2, 2.5, 10, 6.0),
               EvalReport("r1", "a", "", 4, 2.0, 10, 12.0), EvalReport("r1", "a", "v0", 4, 9.0, 10, 12.0)]  # fmt: skip
    c = collect(record, members, uploads, reports)
    assert c.targets == {0: 4, 1: 4} and c.missing_spans == ["span 1-2 (epoch 4)"]  # b's epoch 3 upload is stale
    assert [r.epoch for r in c.before] == [0] and [r.epoch for r in c.after] == [4]  # mid-training report ignored
    assert decide(c, elapsed_s=5, timeout_s=10) is False
    with pytest.raises(FinalizeError, match="missing_span"):
        decide(c, elapsed_s=10, timeout_s=10)
