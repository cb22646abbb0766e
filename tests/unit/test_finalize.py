"""Finalizing a round on Memory and Sqlite stores: replicas, NaN, missing spans, eval gating, timeouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator import eval_gate
from coordinator.finalize import FinalizeError, Outcome, collect, decide, target_epoch
from coordinator.publish import finalize_step
from coordinator.state import EvalReport, MemberRecord, RoundRecord, SpanStateUpload
from swarm.adapter import load_adapter_tensors
from swarm.proto import RoundState
from tests.identities import pid
from tests.unit.finalize_helpers import SPEC, Swarm, span_state

pytestmark = pytest.mark.timeout(30)
TWO = {"a": 0, "b": 1}


@pytest.fixture(params=["memory", "sqlite"])
def swarm(request: pytest.FixtureRequest, tmp_path: Path) -> Swarm:
    return Swarm(tmp_path, store=request.param)


def outcomes(s: Swarm) -> dict[str, float]:
    sample = s.ctx.metrics.registry.get_sample_value
    return {o.value: sample("swarm_coordinator_finalize_total", {"outcome": o.value}) or 0 for o in Outcome}


def candidate_step(s: Swarm) -> None:
    """One finalize pass that finds every span in and assembles the candidate."""
    assert finalize_step(s.ctx, s.key) is None and s.round_id in s.ctx.candidates


def test_agreeing_replicas_publish_a_signed_adapter(swarm: Swarm) -> None:
    swarm.train({"a": 0, "b": 1, "c": 0}, before={"a": 3.0, "b": 2.0})
    swarm.upload("a", 0, span_state(0))
    assert finalize_step(swarm.ctx, swarm.key) is None  # b and c have not uploaded
    assert swarm.ctx.candidates == {}
    swarm.upload("c", 0, {k: v + 1e-7 for k, v in span_state(0).items()})  # within atol: agrees
    swarm.upload("b", 1, span_state(1))
    candidate_step(swarm)
    assert sorted(swarm.candidate.evaluators) == sorted([pid("a"), pid("b")])  # those with a starting eval
    assert swarm.beat("a", 5, 3).eval_candidate_sha256 == swarm.candidate.sha256
    assert swarm.beat("c", 5, 3).eval_candidate_sha256 == ""  # not an evaluator
    swarm.evaluate("a", 2.5)
    assert finalize_step(swarm.ctx, swarm.key) is None  # b is a live evaluator: wait for it
    swarm.evaluate("b", 1.0)
    assert finalize_step(swarm.ctx, swarm.key) is Outcome.PUBLISHED
    record = swarm.ctx.store.get_round("r1")
    assert record is not None and record.state is RoundState.PUBLISHED and record.reason == "published v1"
    [adapter] = swarm.ctx.store.list_adapters()
    assert (adapter.version, adapter.parents, adapter.round_id) == ("v1", (), "r1")
    manifest, tensors = load_adapter_tensors(adapter.path, swarm.key.public_key())
    assert manifest.eval_loss_before == pytest.approx(2.5) and manifest.eval_loss_after == pytest.approx(1.75)
    assert (manifest.method, manifest.parent_version, manifest.base_fingerprint) == ("round", None, "sha256:tiny")
    assert {(c.peer_id, c.samples, c.tokens) for c in manifest.contributors} == {(pid(p), 5, 320) for p in "abc"}
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
    swarm.upload("b", 1, span_state(1), samples=4)  # a 1-1 tie on span 1: the first upload wins, not samples
    swarm.upload("d", 1, span_state(1, seed=9), samples=10**9)
    candidate_step(swarm)
    swarm.evaluate("a", 2.0)
    assert finalize_step(swarm.ctx, swarm.key) is Outcome.PUBLISHED
    record = swarm.ctx.store.get_round("r1")
    assert record is not None
    assert f"kept {pid('c')}, {pid('e')}, outvoted {pid('a')}" in record.reason
    assert f"kept {pid('b')}, outvoted {pid('d')}" in record.reason
    _, tensors = load_adapter_tensors(swarm.config.adapters_dir / "v1", swarm.key.public_key())
    assert all(torch.equal(tensors[k], v) for k, v in {**good, **span_state(1)}.items())
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
    candidate_step(ok)
    ok.evaluate("a", 2.0)
    assert finalize_step(ok.ctx, ok.key) is Outcome.PUBLISHED
    assert f"{pid('b')}'s upload holds NaN/Inf, set aside" in ok.ctx.store.get_round("r1").reason  # type: ignore[union-attr]

    bad = Swarm(tmp_path / "bad", store="sqlite")
    bad.train(TWO, before={"a": 3.0})
    bad.upload("a", 0, span_state(0))
    bad.upload("b", 1, nan)
    assert finalize_step(bad.ctx, bad.key) is Outcome.NONFINITE
    record = bad.ctx.store.get_round("r1")
    assert record is not None and record.state is RoundState.FAILED
    assert record.reason.startswith("nonfinite: span 1-2: every upload holds NaN/Inf")
    assert bad.ctx.store.list_adapters() == [] and not bad.config.adapters_dir.exists()


def test_missing_span_waits_then_fails_at_the_timeout(swarm: Swarm) -> None:
    swarm.train(TWO, before={"a": 3.0})
    swarm.upload("a", 0, span_state(0))
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
    candidate_step(swarm)
    swarm.evaluate("a", 1.5)
    swarm.evaluate("b", 2.6)  # median 2.05 >= 2.0
    assert finalize_step(swarm.ctx, swarm.key) is Outcome.WORSE_THAN_PARENT
    record = swarm.ctx.store.get_round("r1")
    assert record is not None and record.state is RoundState.FAILED and "2.05 is not below" in record.reason
    assert swarm.ctx.store.list_adapters() == [] and outcomes(swarm)["worse_than_parent"] == 1


def test_without_a_starting_eval_nothing_is_published(swarm: Swarm) -> None:
    swarm.train(TWO, before={})
    swarm.upload("a", 0, span_state(0))
    swarm.upload("b", 1, span_state(1))
    swarm.report("a", 3, 1.5)
    candidate_step(swarm)
    assert finalize_step(swarm.ctx, swarm.key) is Outcome.NO_EVAL
    assert "nobody to evaluate" in swarm.ctx.store.get_round("r1").reason  # type: ignore[union-attr]


def test_timeout_goes_with_a_majority_and_stale_epochs_are_ignored(tmp_path: Path) -> None:
    s = Swarm(tmp_path)
    s.train({"a": 0, "b": 1, "c": 0}, before={"a": 3.0, "b": 3.0, "c": 3.0})
    s.upload("a", 0, span_state(0))
    s.upload("b", 1, span_state(1))
    s.upload("c", 0, span_state(0, seed=5), epoch=2)  # a lagging replica: older epoch, ignored
    candidate_step(s)
    s.evaluate("a", 2.0)
    s.evaluate("b", 2.2)
    assert finalize_step(s.ctx, s.key) is None  # c is a live evaluator and owes its report
    s.clock.now += 31
    assert finalize_step(s.ctx, s.key) is Outcome.PUBLISHED  # 2 of 3 evaluators: a majority
    _, tensors = load_adapter_tensors(s.config.adapters_dir / "v1", s.key.public_key())
    assert all(torch.equal(tensors[k], v) for k, v in span_state(0).items())


def test_too_few_evaluators_at_the_timeout_fail(tmp_path: Path) -> None:
    s = Swarm(tmp_path)
    s.train(TWO, before={"a": 3.0, "b": 3.0})
    s.upload("a", 0, span_state(0))
    s.upload("b", 1, span_state(1))
    candidate_step(s)
    s.evaluate("a", 2.0)
    s.clock.now += 31
    assert finalize_step(s.ctx, s.key) is Outcome.NO_EVAL  # 1 of 2 is no majority


def test_collect_and_decide_as_pure_functions() -> None:
    record = RoundRecord("r1", SPEC.to_json(), RoundState.FINALIZING, 0.0, 1.0, 10.0)
    members = [MemberRecord("r1", "a", 0, epoch=4), MemberRecord("r1", "b", 1, epoch=4)]
    uploads = [
        SpanStateUpload("r1", "a", 0, 4, "x", "h", 1, 1, 11.0),
        SpanStateUpload("r1", "b", 1, 3, "y", "h", 1, 1, 11.0),
    ]
    c = collect(record, members, uploads)
    assert c.targets == {0: 4, 1: 3} and c.missing_spans == []  # b's only upload decides span 1
    assert decide(c, elapsed_s=5, timeout_s=10) is True
    c = collect(record, members, uploads[:1])
    assert c.missing_spans == ["span 1-2 (epoch 4)"] and decide(c, elapsed_s=5, timeout_s=10) is False
    with pytest.raises(FinalizeError, match="missing_span"):
        decide(c, elapsed_s=10, timeout_s=10)


def test_target_epoch_is_voted_per_identity_not_the_highest_claim() -> None:
    def up(peer: str, epoch: int) -> SpanStateUpload:
        return SpanStateUpload("r1", peer, 0, epoch, "x", "h", 1, 1, 11.0)

    assert target_epoch([up("h", 10**9), up("a", 5), up("b", 5)], expected=5) == 5  # 2 votes beat 1
    assert target_epoch([up("h", 10**9), up("a", 5)], expected=5) == 5  # a tie goes nearest the expected epoch
    assert target_epoch([up("a", 5), up("a", 6)], expected=5) == 5  # one member, one vote per epoch
    members = [MemberRecord("r1", p, 0, epoch=e) for p, e in [("a", 5), ("b", 5), ("h", 10**9)]]
    record = RoundRecord("r1", SPEC.to_json(), RoundState.FINALIZING, 0.0, 1.0, 10.0)
    assert collect(record, members, [up("h", 10**9), up("a", 5), up("b", 5)]).targets[0] == 5


def test_eval_gate_is_a_median_of_picked_evaluators_naming_the_candidate() -> None:
    record = RoundRecord("r1", SPEC.to_json(), RoundState.FINALIZING, 0.0, 1.0, 10.0)
    sha, other = "a" * 64, "b" * 64
    before = [EvalReport("r1", p, "", 0, 3.0, 10, 5.0) for p in ("p1", "p2", "p3", "p4")]
    picked = eval_gate.pick_evaluators(record, before, quorum=3)
    assert len(picked) == 3 and picked == eval_gate.pick_evaluators(record, list(reversed(before)), 3)
    outsider = next(p for p in ("p1", "p2", "p3", "p4") if p not in picked)
    liar, *honest = picked
    after = [
        EvalReport("r1", liar, "", 3, 0.0, 10**9, 12.0, sha),  # a lie: loss 0 with a huge token count
        EvalReport("r1", honest[0], "", 3, 3.5, 10, 12.0, sha),
        EvalReport("r1", honest[1], "", 3, 3.6, 10, 12.0, sha),
        EvalReport("r1", outsider, "", 3, 0.0, 10, 12.0, sha),  # not picked: does not count
        EvalReport("r1", honest[0], "", 3, 0.0, 10, 12.0, other),  # names another candidate: does not count
    ]
    members = [MemberRecord("r1", p, 0) for p in ("p1", "p2", "p3", "p4")]
    t = eval_gate.tally(record, members, before + after, sha, picked)
    assert t.after == {liar: 0.0, honest[0]: 3.5, honest[1]: 3.6} and eval_gate.decide(t, 0, 10)
    with pytest.raises(FinalizeError, match="worse_than_parent.*3.5 is not below.*3"):
        eval_gate.gate(t)  # the median of three ignores one liar: the candidate is worse, not published


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_member_a_quorum_caught_is_expelled_and_nothing_of_it_is_published(tmp_path: Path, store: str) -> None:
    """x (span 0) uploads a poisoned state first; the two other replicas of span 0 report it with their heartbeats:
    it is removed, named in the round record, refused, and its upload -- which would win a 1-1 tie as the first --
    is not used."""
    from coordinator import handlers
    from coordinator.status_page import status_snapshot
    from coordinator.validation import HandlerError
    from swarm.config import EndCondition
    from swarm.proto import coordinator_pb2 as pb

    swarm = Swarm(tmp_path, store=store, spec=SPEC.model_copy(update={"end": EndCondition(target_epochs=3)}))
    for peer, span in {"a": 0, "b": 1, "c": 0, "d": 1, "x": 0}.items():
        assert swarm.join(peer) == span
    swarm.report("a", 0, 3.0)
    swarm.clock.now += 5
    swarm.beat("x", samples=5, epoch=3)
    poison = {k: v * 100 for k, v in span_state(0).items()}
    swarm.upload("x", 0, poison)

    def accuse(peer: str) -> pb.HeartbeatResponse:
        progress = pb.Progress(samples=5, tokens=320, epoch=1)
        caught = [pb.Accusation(peer_id=pid("x"), reason="gradient norm 62 is 100x the group's median 0.6")]
        return handlers.heartbeat(swarm.ctx, pb.HeartbeatRequest(
            peer_id=pid(peer), round_id=swarm.round_id, progress=progress, credential=swarm.peers.credential(peer),
            accusations=caught))  # fmt: skip

    accuse("a")
    x = swarm.ctx.store.get_member("r1", pid("x"))
    assert x is not None and x.live  # one accuser is not enough
    accuse("c")
    x = swarm.ctx.store.get_member("r1", pid("x"))
    assert x is not None and x.state.value == "expelled" and f"{pid('a')}: gradient norm 62" in x.removed_reason
    assert swarm.ctx.metrics.registry.get_sample_value("swarm_coordinator_members_expelled_total") == 1
    reply = swarm.beat("x", 5, 3)
    assert (reply.ok, reply.action) == (False, "stop") and "was removed from round 'r1'" in reply.message
    rejoin = swarm.peers.join("x")
    assert not rejoin.accepted and rejoin.reject_code == "expelled"
    with pytest.raises(HandlerError, match="was removed from round"):
        swarm.upload("x", 0, poison)
    removed = status_snapshot(swarm.ctx)["round"]["removed"]
    assert removed == [{"peer_id": pid("x"), "reason": x.removed_reason}]
    handlers.leave(swarm.ctx, pb.LeaveRequest(peer_id=pid("c"), round_id="r1", credential=swarm.peers.credential("c")))
    assert [swarm.beat(p, 5, 3).action for p in "abd"][-1] == "finalize"
    swarm.upload("a", 0, span_state(0))
    swarm.upload("b", 1, span_state(1))
    swarm.upload("d", 1, span_state(1))
    candidate_step(swarm)
    swarm.evaluate("a", 2.0)
    assert finalize_step(swarm.ctx, swarm.key) is Outcome.PUBLISHED
    manifest, tensors = load_adapter_tensors(swarm.config.adapters_dir / "v1", swarm.key.public_key())
    assert all(torch.equal(tensors[k], v) for k, v in span_state(0).items()), "the expelled member's state was used"
    assert pid("x") not in {c.peer_id for c in manifest.contributors}
