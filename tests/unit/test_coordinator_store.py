"""Contract suite: every CoordinatorStore implementation behaves the same (flower's linkstate_test pattern)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.state import (
    AdapterRecord,
    AlreadyExists,
    Capacity,
    Conflict,
    Contribution,
    CoordinatorStore,
    EvalReport,
    Heartbeat,
    JoinRejection,
    MemberRecord,
    MemberState,
    NotFound,
    RoundRecord,
    SpanStateUpload,
)
from coordinator.store_memory import MemoryStore
from coordinator.store_sqlite import SCHEMA_VERSION, SqliteStore, StoreVersionError
from swarm.config import BaseModelRef, RoundSpec, split_even
from swarm.proto import RoundState

pytestmark = pytest.mark.timeout(30)


def spec(round_id: str = "r1", parent: str = "") -> RoundSpec:
    base = BaseModelRef(path="/models/tiny", fingerprint="fp", num_layers=4)
    return RoundSpec(round_id=round_id, base=base, spans=split_even(4, 2), parent_adapter=parent)


def member(peer: str, span: int = 0, round_id: str = "r1", **kw: object) -> MemberRecord:
    cap = Capacity(memory_bytes=1 << 30, device="cpu", throughput=2.5)
    return MemberRecord(round_id, peer, span, ("/ip4/127.0.0.1/tcp/1",), cap, 2.5, 10.0, 10.0, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CoordinatorStore]:
    s: CoordinatorStore = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "state.sqlite3")
    s.create_round(RoundRecord.new(spec(), now=1.0))
    yield s
    s.close()


def test_rounds_create_get_list_and_duplicates(store: CoordinatorStore) -> None:
    r = store.get_round("r1")
    assert r is not None and r.state is RoundState.OPEN and r.created_at == 1.0 and r.spec == spec()
    assert store.get_round("nope") is None
    with pytest.raises(AlreadyExists, match="r1"):
        store.create_round(RoundRecord.new(spec(), now=2.0))
    store.create_round(RoundRecord.new(spec("r2", parent="v1"), now=3.0))
    assert [r.round_id for r in store.list_rounds()] == ["r1", "r2"]
    assert store.list_rounds()[1].parent_adapter == "v1"


def test_round_state_is_compare_and_set(store: CoordinatorStore) -> None:
    r = store.set_round_state("r1", RoundState.TRAINING, expected=RoundState.OPEN, started_at=5.0)
    assert (r.state, r.started_at, r.ended_at) == (RoundState.TRAINING, 5.0, None)
    with pytest.raises(Conflict, match="training, expected open"):
        store.set_round_state("r1", RoundState.FAILED, expected=RoundState.OPEN)
    r = store.set_round_state("r1", RoundState.FINALIZING, expected=RoundState.TRAINING, ended_at=9.0, reason="end")
    assert (r.started_at, r.ended_at, r.reason) == (5.0, 9.0, "end")  # times not given are kept
    r = store.set_round_state("r1", RoundState.FAILED, expected=RoundState.FINALIZING)
    assert r.reason == "end" and store.get_round("r1") == r  # a reason not given is kept
    with pytest.raises(NotFound, match="nope"):
        store.set_round_state("nope", RoundState.FAILED, expected=RoundState.OPEN)


def test_active_and_current_round(store: CoordinatorStore) -> None:
    assert store.active_round() is not None and store.current_round().round_id == "r1"  # type: ignore[union-attr]
    store.set_round_state("r1", RoundState.FAILED, expected=RoundState.OPEN)
    assert store.active_round() is None
    assert store.current_round().round_id == "r1"  # type: ignore[union-attr]


def test_members_put_get_list_replace(store: CoordinatorStore) -> None:
    store.put_member(member("a", 0))
    store.put_member(member("b", 1))
    got = store.get_member("r1", "a")
    assert got == member("a", 0)
    assert store.get_member("r1", "zz") is None
    store.put_member(member("a", 1, epoch=3))  # re-join replaces, keeps its place in the listing
    assert [m.peer_id for m in store.list_members("r1")] == ["a", "b"]
    assert store.get_member("r1", "a").span_index == 1  # type: ignore[union-attr]
    with pytest.raises(NotFound, match="r9"):
        store.put_member(member("a", 0, round_id="r9"))


def test_member_states_and_moves(store: CoordinatorStore) -> None:
    for p in "abc":
        store.put_member(member(p, epoch=2))
    store.set_member_states("r1", ["a", "c", "ghost"], MemberState.DEAD)
    assert [m.peer_id for m in store.list_members("r1", MemberState.LIVE)] == ["b"]
    assert [m.peer_id for m in store.list_members("r1", MemberState.DEAD)] == ["a", "c"]
    store.put_member(member("d", 0, epoch=4))
    store.move_members("r1", {"b": 1, "d": 0, "ghost": 0})
    b, d = store.get_member("r1", "b"), store.get_member("r1", "d")
    assert b is not None and (b.span_index, b.epoch) == (1, 0)
    assert d is not None and (d.span_index, d.epoch) == (0, 4)  # not moved: keeps its epoch


def test_heartbeat_accumulates_contributions(store: CoordinatorStore) -> None:
    store.put_member(member("a"))
    m = store.record_heartbeat("r1", "a", Heartbeat(samples=10, tokens=100, epoch=1, loss=2.0, throughput=4.0), 20.0)
    assert (m.last_heartbeat, m.session_samples, m.epoch, m.loss, m.throughput) == (20.0, 10, 1, 2.0, 4.0)
    m = store.record_heartbeat("r1", "a", Heartbeat(samples=10, tokens=100, epoch=0), 21.0)  # a retry
    assert (m.epoch, m.loss, m.throughput) == (1, 2.0, 4.0)  # epoch never decreases; 0/None keep values
    store.record_heartbeat("r1", "a", Heartbeat(samples=25, tokens=250, epoch=2), 22.0)
    with pytest.raises(Conflict, match="backwards"):
        store.record_heartbeat("r1", "a", Heartbeat(samples=5, tokens=250, epoch=2), 23.0)
    store.put_member(member("a"))  # a restart re-joins: session counters start over, contribution stays
    store.record_heartbeat("r1", "a", Heartbeat(samples=5, tokens=50, epoch=2), 24.0)
    assert store.list_contributions("r1") == [Contribution("r1", "a", 30, 300)]
    with pytest.raises(NotFound, match="'b'"):
        store.record_heartbeat("r1", "b", Heartbeat(0, 0, 0), 25.0)


def test_contributions_survive_the_round_ending(store: CoordinatorStore) -> None:
    store.put_member(member("a"))
    store.record_heartbeat("r1", "a", Heartbeat(7, 70, 1), 2.0)
    store.set_round_state("r1", RoundState.FAILED, expected=RoundState.OPEN)
    assert [(c.peer_id, c.samples, c.tokens) for c in store.list_contributions("r1")] == [("a", 7, 70)]


def test_span_states_replace_same_key(store: CoordinatorStore) -> None:
    up = SpanStateUpload("r1", "a", 0, 1, "r1/span0-2/a.epoch1.safetensors", "h1", 10, 5, 3.0)
    store.put_span_state(up)
    store.put_span_state(SpanStateUpload("r1", "b", 0, 1, "p2", "h2", 11, 6, 4.0))
    store.put_span_state(SpanStateUpload("r1", "a", 0, 1, "p3", "h3", 12, 7, 5.0))
    assert [(u.peer_id, u.sha256) for u in store.list_span_states("r1")] == [("b", "h2"), ("a", "h3")]
    assert store.list_span_states("r2") == []


def test_eval_reports(store: CoordinatorStore) -> None:
    e1 = EvalReport("r1", "a", "", 2, 1.5, 1000, 3.0)
    e2 = EvalReport("r2", "b", "v1", 0, 1.25, 500, 4.0, candidate_sha256="c" * 64)
    store.add_eval_report(e1)
    store.add_eval_report(e2)
    assert store.list_eval_reports() == [e1, e2]
    assert store.list_eval_reports("r2") == [e2]
    assert [store.count_eval_reports(*k) for k in (("r1", "a"), ("r2", "b"), ("r1", "b"), ("r9", "a"))] == [1, 1, 0, 0]
    assert store.delete_eval_reports("r1") == 1 and store.delete_eval_reports("r1") == 0  # retention
    assert store.list_eval_reports() == [e2]


def test_member_credential_digest_is_kept_and_replaced(store: CoordinatorStore) -> None:
    store.put_member(member("a", 0, credential_sha256="d1"))
    assert store.get_member("r1", "a").credential_sha256 == "d1"  # type: ignore[union-attr]
    store.put_member(member("a", 0, credential_sha256="d2"))  # a new Join issues a new credential
    assert [m.credential_sha256 for m in store.list_members("r1")] == ["d2"]


def test_adapters_registry(store: CoordinatorStore) -> None:
    a1 = AdapterRecord("v1", (), "r1", "/a/v1", "s1", 5.0, None, 2.0)
    a2 = AdapterRecord("v2", ("v1",), "r2", "/a/v2", "s2", 6.0, 2.0, 1.8)
    store.add_adapter(a1)
    store.add_adapter(a2)
    assert store.list_adapters() == [a1, a2]
    assert store.get_adapter("v2") == a2 and store.get_adapter("v3") is None
    with pytest.raises(AlreadyExists, match="v1"):
        store.add_adapter(a1)


def test_join_rejections(store: CoordinatorStore) -> None:
    j = JoinRejection("a", "r1", "fingerprint", "load the base model", 2.0)
    store.add_rejection(j)
    assert store.list_rejections() == [j]


def test_sqlite_reopen_finds_everything(tmp_path: Path) -> None:
    path = tmp_path / "coordinator" / "state.sqlite3"
    s1 = SqliteStore(path)
    s1.create_round(RoundRecord.new(spec(), 1.0))
    s1.set_round_state("r1", RoundState.TRAINING, expected=RoundState.OPEN, started_at=2.0)
    s1.put_member(member("a", 1))
    s1.record_heartbeat("r1", "a", Heartbeat(3, 30, 1, 0.5, 9.0), 4.0)
    up = SpanStateUpload("r1", "a", 1, 1, "x", "h", 1, 3, 5.0)
    s1.put_span_state(up)
    ev = EvalReport("r1", "a", "", 1, 1.0, 10, 6.0)
    s1.add_eval_report(ev)
    ad = AdapterRecord("v1", ("v0",), "r1", "/a", "h", 7.0, 2.0, 1.0)
    s1.add_adapter(ad)
    rej = JoinRejection("b", "r1", "software_version", "upgrade", 8.0)
    s1.add_rejection(rej)
    before = (s1.list_rounds(), s1.list_members("r1"), s1.list_contributions("r1"))
    s1.close()

    s2 = SqliteStore(path)
    assert (s2.list_rounds(), s2.list_members("r1"), s2.list_contributions("r1")) == before
    assert s2.get_member("r1", "a").loss == 0.5  # type: ignore[union-attr]
    assert s2.list_span_states("r1") == [up] and s2.list_eval_reports() == [ev]
    assert s2.list_adapters() == [ad] and s2.list_rejections() == [rej]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s2.close()


def test_sqlite_migrates_a_version_1_database(tmp_path: Path) -> None:
    from coordinator.store_sqlite import MIGRATIONS

    path = tmp_path / "state.sqlite3"
    con = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        con.execute(statement)
    con.execute("INSERT INTO rounds VALUES ('r1', ?, 'published', 1.0, 2.0, 3.0, '')", (spec().to_json(),))
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    s = SqliteStore(path)
    r = s.get_round("r1")
    assert r is not None and r.state is RoundState.PUBLISHED and r.reason == ""
    s.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    SqliteStore(path).close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(StoreVersionError, match="upgrade loraswarm"):
        SqliteStore(path)
