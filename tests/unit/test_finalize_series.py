"""Round series and lineage: the next round starts from the new adapter; restarts resume half-done publishing."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import handlers, publish
from coordinator.finalize import Outcome
from coordinator.lifecycle import RoundEvent
from coordinator.publish import continue_series, finalize_step, next_version
from coordinator.rounds import apply_event
from swarm.adapter import AdapterInfo, read_manifest, verify_adapter, write_adapter
from swarm.proto import RoundState
from swarm.proto import coordinator_pb2 as pb
from tests.unit.finalize_helpers import LORA, SPEC, Swarm, span_state

pytestmark = pytest.mark.timeout(30)
TWO = {"a": 0, "b": 1}


def ready_to_publish(tmp_path: Path, evaluated: bool = True) -> Swarm:
    """Peers a and b trained and uploaded spans 0 and 1; with ``evaluated``, the coordinator assembled the
    candidate and a, its evaluator, reported a final eval of it (lower than before)."""
    s = Swarm(tmp_path)
    s.train(TWO, before={"a": 3.0})
    s.upload("a", 0, span_state(0))
    s.upload("b", 1, span_state(1))
    if evaluated:
        assert finalize_step(s.ctx, s.key) is None  # assembles the candidate, picks a as its evaluator
        s.evaluate("a", 2.0)
    return s


def run_round(s: Swarm, before: float = 3.0, after: float = 2.0, seed: int = 0) -> Outcome | None:
    s.train(TWO, before={"a": before})
    s.upload("a", 0, span_state(0, seed))
    s.upload("b", 1, span_state(1, seed))
    outcome = finalize_step(s.ctx, s.key)  # the candidate (or a failure found before it)
    if outcome is not None:
        return outcome
    s.evaluate("a", after)
    return finalize_step(s.ctx, s.key)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_next_round_starts_from_the_new_adapter_until_the_series_ends(tmp_path: Path, store: str) -> None:
    s = Swarm(tmp_path, store=store, rounds=2)
    assert run_round(s) is Outcome.PUBLISHED
    rounds = s.ctx.store.list_rounds()
    assert [(r.round_id, r.state, r.parent_adapter) for r in rounds] == [
        ("r1", RoundState.PUBLISHED, ""), ("r1-r2", RoundState.OPEN, "v1")]  # fmt: skip
    assert rounds[1].spec.parent_adapter == "v1" and rounds[1].spec.lora == SPEC.lora
    rejoin = s.beat("a", 5, 3, round_id="r1")  # r1's members are told to move to r1-r2
    assert (rejoin.ok, rejoin.action, rejoin.next_round_id) == (False, "rejoin", "r1-r2")
    spec = handlers.get_round_spec(s.ctx, pb.GetRoundSpecRequest(round_id="r1"))
    assert (spec.adapter_version, spec.reason) == ("v1", "published v1")

    s.clock.now += 100
    assert run_round(s, before=2.0, after=1.5, seed=1) is Outcome.PUBLISHED  # same peer ids rejoin r1-r2
    v2 = s.ctx.store.get_adapter("v2")
    assert v2 is not None and v2.parents == ("v1",) and v2.round_id == "r1-r2"
    manifest = verify_adapter(v2.path, s.key.public_key())
    assert (manifest.parent_version, manifest.eval_loss_before, manifest.eval_loss_after) == ("v1", 2.0, 1.5)
    assert s.ctx.store.active_round() is None  # rounds=2: the series is over
    assert continue_series(s.ctx, s.clock()) is None
    assert s.beat("a", 5, 3, round_id="r1-r2").action == "stop"


def test_a_failed_round_is_retried_from_the_same_parent(tmp_path: Path) -> None:
    s = Swarm(tmp_path, rounds=0)  # no limit
    assert run_round(s, before=2.0, after=2.5) is Outcome.WORSE_THAN_PARENT
    nxt = s.ctx.store.active_round()
    assert nxt is not None and (nxt.round_id, nxt.parent_adapter) == ("r1-r2", "")
    failed = s.ctx.store.get_round("r1")
    assert failed is not None and failed.reason.startswith("worse_than_parent: ")


def test_restart_after_registering_only_marks_the_round_published(tmp_path: Path) -> None:
    s = Swarm(tmp_path, store="sqlite", rounds=2)
    assert run_round(s) is Outcome.PUBLISHED
    # simulate a crash right after add_adapter: the round is still finalizing and no next round exists
    sqlite = s.ctx.store
    sqlite._conn.execute("UPDATE rounds SET state = 'finalizing', reason = '' WHERE round_id = 'r1'")  # type: ignore[attr-defined]
    sqlite._conn.execute("DELETE FROM rounds WHERE round_id = 'r1-r2'")  # type: ignore[attr-defined]
    assert finalize_step(s.ctx, s.key) is Outcome.PUBLISHED
    assert [a.version for a in s.ctx.store.list_adapters()] == ["v1"]
    assert s.ctx.store.get_round("r1").reason == "published v1; resumed after a restart"  # type: ignore[union-attr]
    assert s.ctx.store.active_round().round_id == "r1-r2"  # type: ignore[union-attr]


def test_an_unregistered_adapter_dir_of_the_round_is_adopted(tmp_path: Path) -> None:
    s = Swarm(tmp_path)
    s.train(TWO, before={"a": 3.0})
    # a crash between write_adapter and add_adapter left v1 on disk; a foreign dir v2 is ignored
    info = AdapterInfo(version="v1", round_id="r1", base_model="/models/tiny", base_fingerprint="sha256:tiny")
    write_adapter(s.config.adapters_dir / "v1", {**span_state(0), **span_state(1)}, LORA, info, s.key)
    (s.config.adapters_dir / "v2").mkdir()
    assert next_version(s.ctx) == "v3"
    assert finalize_step(s.ctx, s.key) is Outcome.PUBLISHED
    v1 = s.ctx.store.get_adapter("v1")
    assert v1 is not None and v1.round_id == "r1" and read_manifest(v1.path).version == "v1"


def test_round_spec_without_fingerprint_cannot_publish(tmp_path: Path) -> None:
    spec = SPEC.model_copy(update={"base": SPEC.base.model_copy(update={"fingerprint": ""})})
    s = Swarm(tmp_path, spec=spec)
    assert run_round(s) is Outcome.INVALID_SPEC
    assert "base.fingerprint" in s.ctx.store.get_round("r1").reason  # type: ignore[union-attr]


def test_a_round_that_ends_during_assembly_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = ready_to_publish(tmp_path, evaluated=False)
    real = publish.assemble

    def assemble_while_failed_elsewhere(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        record = s.ctx.store.get_round("r1")
        assert record is not None
        apply_event(s.ctx.store, record, RoundEvent.FAIL, s.clock(), "operator")
        return out

    monkeypatch.setattr(publish, "assemble", assemble_while_failed_elsewhere)
    assert finalize_step(s.ctx, s.key) is None
    assert s.ctx.store.list_adapters() == [] and not s.config.adapters_dir.exists()
    assert s.ctx.candidates == {}  # no candidate of a failed round


def test_unexpected_errors_are_retried_until_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = ready_to_publish(tmp_path)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish, "write_adapter", disk_full)
    assert finalize_step(s.ctx, s.key) is None  # retried on the next pass
    assert s.ctx.store.get_round("r1").state is RoundState.FINALIZING  # type: ignore[union-attr]
    s.clock.now += 31
    assert finalize_step(s.ctx, s.key) is Outcome.ERROR
    assert "No space left on device" in s.ctx.store.get_round("r1").reason  # type: ignore[union-attr]


def test_retention_drops_blobs_and_eval_reports_of_old_rounds(tmp_path: Path) -> None:
    s = Swarm(tmp_path, rounds=3, keep_rounds=1)
    assert run_round(s) is Outcome.PUBLISHED
    assert (s.config.blob_dir / "r1").is_dir() and s.ctx.store.list_eval_reports("r1")
    s.clock.now += 100
    assert run_round(s, before=2.0, after=1.5, seed=1) is Outcome.PUBLISHED  # r1-r2 ends: r1 is beyond keep_rounds
    assert not (s.config.blob_dir / "r1").exists() and s.ctx.store.list_eval_reports("r1") == []
    assert (s.config.blob_dir / "r1-r2" / "candidate.safetensors").is_file()
    assert s.ctx.store.list_eval_reports("r1-r2") and s.ctx.candidates == {}
    assert [a.version for a in s.ctx.store.list_adapters()] == ["v1", "v2"]  # the registry is never pruned
