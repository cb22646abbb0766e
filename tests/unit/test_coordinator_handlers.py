"""Membership handlers called as plain functions (no sockets), on both stores, with a fake clock."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coordinator import handlers
from coordinator.config import CoordinatorConfig
from coordinator.context import CoordinatorContext
from coordinator.finalize import collect
from coordinator.membership import sweep
from coordinator.roster import build_roster
from coordinator.rounds import RoundConflict, live_replicas, open_round
from coordinator.state import AdapterRecord, MemberState
from coordinator.store_memory import MemoryStore
from coordinator.store_sqlite import SqliteStore
from coordinator.validation import HandlerError
from swarm.config import BaseModelRef, EndCondition, RoundSpec, SpanRange, split_even
from swarm.proto import NO_SPAN, RoundState
from swarm.proto import coordinator_pb2 as pb
from tests.identities import Peers, pid

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_spec(round_id: str = "r1", num_spans: int = 2, end: EndCondition | None = None) -> RoundSpec:
    base = BaseModelRef(path="/models/tiny-llama", fingerprint="fp-good", num_layers=4)
    return RoundSpec(round_id=round_id, base=base, spans=split_even(4, num_spans),
                     end=end or EndCondition(target_samples=100))  # fmt: skip


@pytest.fixture(params=["memory", "sqlite"])
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CoordinatorContext]:
    config = CoordinatorConfig(workdir=tmp_path, join_token="s3cret", heartbeat_interval_s=1, heartbeat_timeout_s=10)
    store = MemoryStore() if request.param == "memory" else SqliteStore(config.db_path)
    c = CoordinatorContext(store=store, config=config, clock=Clock())
    open_round(store, make_spec(), c.clock())
    yield c
    store.close()


PEERS: dict[int, Peers] = {}  # id(ctx) -> its test peers


def peers(ctx: CoordinatorContext) -> Peers:
    return PEERS.setdefault(id(ctx), Peers(ctx, base_fingerprint="fp-good", software_version="0.1.7",
                                           join_token="s3cret", capacity=pb.Capacity(throughput=1.0)))  # fmt: skip


def join(ctx: CoordinatorContext, peer: str, **kw: object) -> pb.JoinResponse:
    kw.setdefault("multiaddrs", [f"/ip4/127.0.0.1/tcp/1/p2p/{pid(peer)}"])
    return peers(ctx).join(peer, **kw)


def beat(ctx: CoordinatorContext, peer: str, samples: int = 0, **kw: object) -> pb.HeartbeatResponse:
    progress = pb.Progress(samples=samples, tokens=samples * 10, **kw)  # type: ignore[arg-type]
    req = pb.HeartbeatRequest(
        peer_id=pid(peer), round_id="r1", progress=progress, credential=peers(ctx).credential(peer)
    )
    return handlers.heartbeat(ctx, req)


def leave(ctx: CoordinatorContext, peer: str) -> pb.LeaveResponse:
    return handlers.leave(
        ctx, pb.LeaveRequest(peer_id=pid(peer), round_id="r1", credential=peers(ctx).credential(peer))
    )


def error(fn: object, *args: object, **kw: object) -> HandlerError:
    with pytest.raises(HandlerError) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return info.value


def test_join_assigns_spans_and_starts_training(ctx: CoordinatorContext) -> None:
    r1 = join(ctx, "a")
    assert r1.accepted and (r1.span.start, r1.span.end) == (0, 2) and r1.round_id == "r1"
    assert RoundSpec.from_json(r1.round_spec_json) == make_spec() and r1.heartbeat_interval_s == 1
    assert ctx.store.get_round("r1").state is RoundState.OPEN  # type: ignore[union-attr]
    assert beat(ctx, "a").action == "wait"
    r2 = join(ctx, "b")
    assert (r2.span.start, r2.span.end) == (2, 4)
    assert ctx.store.get_round("r1").state is RoundState.TRAINING  # type: ignore[union-attr]
    r3 = join(ctx, "c", capacity=pb.Capacity(throughput=5.0))
    assert r3.span.start == 0  # tie on throughput -> lowest index
    assert join(ctx, "c").span.start == 0  # a live member re-joining keeps its span
    assert beat(ctx, "a").action == "continue"


def test_a_trainer_only_member_hosts_no_span_and_holds_up_nothing(ctx: CoordinatorContext) -> None:
    trainer = join(ctx, "t", role="trainer")
    assert trainer.accepted and not trainer.HasField("span") and trainer.credential
    member = ctx.store.get_member("r1", pid("t"))
    assert member is not None and member.span_index == NO_SPAN and member.live
    assert ctx.store.get_round("r1").state is RoundState.OPEN  # type: ignore[union-attr]  # no span is served yet
    a, b = join(ctx, "a"), join(ctx, "b")
    assert [(r.span.start, r.span.end) for r in (a, b)] == [(0, 2), (2, 4)]  # the trainer took no span's place
    assert ctx.store.get_round("r1").state is RoundState.TRAINING  # type: ignore[union-attr]
    answer = beat(ctx, "t", samples=4)
    assert answer.ok and not answer.HasField("span") and answer.action == "continue"
    record = ctx.store.get_round("r1")
    assert record is not None
    roster = build_roster(ctx.store, record, ctx.clock())
    assert {p["peer_id"]: p["span"] for p in roster["peers"]} == {pid("t"): None, pid("a"): [0, 2], pid("b"): [2, 4]}
    assert [r.peer_id for r in live_replicas(ctx.store, "r1")] == [pid("a"), pid("b")]
    collected = collect(record, ctx.store.list_members("r1"), [])  # finalize waits for span uploads only
    assert not any(pid("t") in w for w in collected.waiting_for), collected.waiting_for
    assert collected.waiting_for == ["span 0-2 (epoch 0)", "span 2-4 (epoch 0)", f"upload from {pid('a')}",
                                     f"upload from {pid('b')}"]  # fmt: skip
    assert error(join, ctx, "x", role="trainer-ish").code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_join_honours_a_chosen_span_and_a_block_limit(kind: str, tmp_path: Path) -> None:
    config = CoordinatorConfig(workdir=tmp_path, join_token="s3cret", heartbeat_interval_s=1, heartbeat_timeout_s=10)
    store = MemoryStore() if kind == "memory" else SqliteStore(config.db_path)
    ctx = CoordinatorContext(store=store, config=config, clock=Clock())
    spec = make_spec().model_copy(update={"spans": (SpanRange(start=0, end=1), SpanRange(start=1, end=4))})
    open_round(store, spec, ctx.clock())
    try:
        # "a" asks for 1-4 (we would pick the uncovered 0-1); it is also the slowest, so a rebalance would move it
        chose = join(ctx, "a", preferred_span=pb.Span(start=1, end=4), quantize="nf4",
                     capacity=pb.Capacity(throughput=0.5))  # fmt: skip
        assert chose.accepted and (chose.span.start, chose.span.end) == (1, 4)
        member = store.get_member("r1", pid("a"))
        assert member is not None and member.pinned and member.capacity.quantize == "nf4"
        small = join(ctx, "b", max_blocks=1)
        assert (small.span.start, small.span.end) == (0, 1)
        small2 = join(ctx, "b2", max_blocks=2)  # 0-1 is covered now, but 1-4 does not fit
        assert (small2.span.start, small2.span.end) == (0, 1)
        free = join(ctx, "h")
        assert (free.span.start, free.span.end) == (1, 4)
        refused = join(ctx, "c", preferred_span=pb.Span(start=1, end=3))
        assert not refused.accepted and refused.reject_code == "span"
        assert "span 1-3 is not a span of round 'r1' (its spans: 0-1, 1-4)" in refused.reject_reason
        too_big = join(ctx, "d", preferred_span=pb.Span(start=1, end=4), max_blocks=2)
        assert not too_big.accepted and "span 1-4 has 3 blocks but this peer hosts at most 2" in too_big.reject_reason
        assert store.get_member("r1", pid("c")) is None and store.get_member("r1", pid("d")) is None
        assert "quantize must be one of none, nf4, int8" in error(join, ctx, "e", quantize="fp4").message
        # span 0-1 loses its servers: the volunteer's choice holds, the one free to move fills the hole
        leave(ctx, "b")
        leave(ctx, "b2")
        spans = {p: store.get_member("r1", pid(p)).span_index for p in ("a", "h")}  # type: ignore[union-attr]
        assert spans == {"a": 1, "h": 0}
    finally:
        store.close()


def test_join_refused_when_no_span_fits(ctx: CoordinatorContext) -> None:
    r = join(ctx, "a", max_blocks=1)
    assert not r.accepted and r.reject_code == "span"
    assert "no span of round 'r1' fits: its spans are 0-2, 2-4, and this peer hosts at most 1 block(s)" in (
        r.reject_reason
    )
    assert join(ctx, "a", max_blocks=2).accepted


def test_join_rejects_wrong_fingerprint_and_version(ctx: CoordinatorContext) -> None:
    r = join(ctx, "a", base_fingerprint="fp-bad")
    assert not r.accepted and r.reject_code == "fingerprint"
    assert "fp-bad does not match the round's fp-good: load the base model /models/tiny-llama" in r.reject_reason
    r = join(ctx, "a", software_version="0.2.0")
    assert not r.accepted and r.reject_code == "software_version" and "install loraswarm 0.1.x" in r.reject_reason
    assert [j.reason for j in ctx.rejections] == ["fingerprint", "software_version"]
    assert ctx.store.list_rejections() == []  # refusals cost the caller nothing: they never grow the database
    assert ctx.store.list_members("r1") == []
    sample = ctx.metrics.registry.get_sample_value
    assert sample("swarm_coordinator_join_rejections_total", {"reason": "fingerprint"}) == 1


def test_join_wrong_token_is_permission_denied(ctx: CoordinatorContext) -> None:
    e = error(join, ctx, "a", join_token="guess")
    assert e.code is grpc.StatusCode.PERMISSION_DENIED and "join_token" in e.message
    assert [j.reason for j in ctx.rejections] == ["join_token"]


def test_join_unknown_round_is_not_found(ctx: CoordinatorContext) -> None:
    e = error(join, ctx, "a", round_id="r404")
    assert e.code is grpc.StatusCode.NOT_FOUND and "'r404' does not exist; the current round is 'r1'" in e.message


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"peer_id": ""}, "peer_id"), ({"peer_id": "../etc"}, "peer_id"), ({"multiaddrs": [""]}, "multiaddrs[0]"),
     ({"capacity": pb.Capacity(throughput=math.nan)}, "capacity.throughput"),
     ({"capacity": pb.Capacity(throughput=-1)}, "capacity.throughput")],
)  # fmt: skip
def test_join_malformed_input_names_the_field(ctx: CoordinatorContext, kw: dict, field: str) -> None:
    kw = dict(kw)  # parameters are shared between the two stores
    e = error(join, ctx, "a", **kw)
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT and e.message.startswith(field)


def test_join_closed_round_is_refused(ctx: CoordinatorContext) -> None:
    ctx.store.set_round_state("r1", RoundState.FAILED, expected=RoundState.OPEN)
    e = error(join, ctx, "a")
    assert e.code is grpc.StatusCode.FAILED_PRECONDITION  # no active round to join
    r = join(ctx, "a", round_id="r1")
    assert not r.accepted and r.reject_code == "round_closed" and "wait for the next round" in r.reject_reason


@pytest.mark.parametrize(
    ("progress", "field"),
    [({"samples": -1}, "progress.samples"), ({"tokens": -5}, "progress.tokens"), ({"epoch": -1}, "progress.epoch"),
     ({"loss": math.nan}, "progress.loss"), ({"loss": math.inf}, "progress.loss"),
     ({"throughput": math.nan}, "progress.throughput")],
)  # fmt: skip
def test_heartbeat_malformed_progress(ctx: CoordinatorContext, progress: dict, field: str) -> None:
    join(ctx, "a")
    req = pb.HeartbeatRequest(peer_id=pid("a"), round_id="r1", progress=pb.Progress(**progress),
                              credential=peers(ctx).credential("a"))  # fmt: skip
    e = error(handlers.heartbeat, ctx, req)
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT and e.message.startswith(field)
    assert ctx.store.get_member("r1", pid("a")).live  # type: ignore[union-attr]


def test_heartbeat_progress_ends_round(ctx: CoordinatorContext) -> None:
    join(ctx, "a")
    join(ctx, "b")
    ctx.clock.now += 1  # type: ignore[attr-defined]  # counters may grow by max_samples_per_s per second
    assert beat(ctx, "a", 40, loss=2.5, epoch=3).round_state == "training"
    e = error(beat, ctx, "a", 30)
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT and "went backwards" in e.message
    r = beat(ctx, "b", 60, epoch=3)  # samples count up to (epochs + 1) * target_batch_size: 128 here
    assert (r.round_state, r.action) == ("finalizing", "finalize")
    assert sorted((c.samples, c.tokens) for c in ctx.store.list_contributions("r1")) == [(40, 400), (60, 600)]
    spec = handlers.get_round_spec(ctx, pb.GetRoundSpecRequest())
    assert (spec.state, spec.samples, spec.started_at, spec.ended_at) == ("finalizing", 100, 1000.0, 1001.0)


def test_heartbeat_from_unknown_peer_asks_to_rejoin(ctx: CoordinatorContext) -> None:
    r = beat(ctx, "ghost")
    assert not r.ok and r.action == "rejoin" and "never joined" in r.message
    e = error(handlers.heartbeat, ctx, pb.HeartbeatRequest(peer_id=pid("a"), round_id="nope"))
    assert e.code is grpc.StatusCode.NOT_FOUND and "'nope'" in e.message


def test_heartbeat_epoch_of_another_span_is_ignored(ctx: CoordinatorContext) -> None:
    join(ctx, "a")
    old = pb.Span(start=2, end=4)
    req = pb.HeartbeatRequest(peer_id=pid("a"), round_id="r1", progress=pb.Progress(epoch=7), span=old,
                              credential=peers(ctx).credential("a"))  # fmt: skip
    assert handlers.heartbeat(ctx, req).ok and ctx.store.get_member("r1", pid("a")).epoch == 0  # type: ignore[union-attr]
    req.span.CopyFrom(pb.Span(start=1, end=3))
    e = error(handlers.heartbeat, ctx, req)
    assert e.code is grpc.StatusCode.INVALID_ARGUMENT and "span [1, 3) is not one of round 'r1'" in e.message


def test_timeout_marks_dead_and_rebalances(ctx: CoordinatorContext) -> None:
    for p in "abc":  # a -> span 0, b -> span 1, c -> span 0
        join(ctx, p)
    clock: Clock = ctx.clock  # type: ignore[assignment]
    clock.now += 6
    beat(ctx, "a")
    beat(ctx, "c")
    clock.now += 6  # b silent for 12 s > 10 s
    assert sweep(ctx) == [pid("b")]
    assert ctx.store.get_member("r1", pid("b")).state is MemberState.DEAD  # type: ignore[union-attr]
    assert pid("c") < pid("a")
    moved = beat(ctx, "c")  # a and c tie on throughput; c's peer id sorts first: it moves to the uncovered span
    assert moved.ok and (moved.span.start, moved.span.end) == (2, 4)
    r = beat(ctx, "b")
    assert not r.ok and r.action == "rejoin" and "(dead)" in r.message
    assert ctx.metrics.registry.get_sample_value("swarm_coordinator_members_expired_total") == 1


def test_lazy_expiry_on_requests(ctx: CoordinatorContext) -> None:
    join(ctx, "a")
    ctx.clock.now += 11  # type: ignore[attr-defined]
    handlers.get_round_spec(ctx, pb.GetRoundSpecRequest(round_id="r1"))  # no sweep thread: the request expires it
    assert ctx.store.get_member("r1", pid("a")).state is MemberState.DEAD  # type: ignore[union-attr]
    assert join(ctx, "a").accepted  # and it may come back
    assert ctx.store.get_member("r1", pid("a")).live  # type: ignore[union-attr]


def test_leave_rebalances(ctx: CoordinatorContext) -> None:
    for p in "abc":
        join(ctx, p)
    assert leave(ctx, "b").ok
    assert ctx.store.get_member("r1", pid("b")).state is MemberState.LEFT  # type: ignore[union-attr]
    assert ctx.store.get_member("r1", pid("c")).span_index == 1  # type: ignore[union-attr]  # c's id sorts first
    assert not leave(ctx, "b").ok


def test_deadline_ends_round_on_sweep(ctx: CoordinatorContext) -> None:
    ctx.store.set_round_state("r1", RoundState.FAILED, expected=RoundState.OPEN)
    open_round(ctx.store, make_spec("r2", num_spans=1, end=EndCondition(deadline_s=30)), ctx.clock())
    join(ctx, "a")
    assert ctx.store.get_round("r2").state is RoundState.TRAINING  # type: ignore[union-attr]
    ctx.clock.now += 31  # type: ignore[attr-defined]
    sweep(ctx)
    assert ctx.store.get_round("r2").state is RoundState.FINALIZING  # type: ignore[union-attr]


def test_open_round_conflicts(ctx: CoordinatorContext) -> None:
    with pytest.raises(RoundConflict, match="'r1' is still open"):
        open_round(ctx.store, make_spec("r2"), 0.0)
    ctx.store.set_round_state("r1", RoundState.FAILED, expected=RoundState.OPEN)
    with pytest.raises(RoundConflict, match="already used"):
        open_round(ctx.store, make_spec("r1"), 0.0)
    with pytest.raises(RoundConflict, match="adapter 'v9'"):
        open_round(ctx.store, make_spec("r2").model_copy(update={"parent_adapter": "v9"}), 0.0)
    ctx.store.add_adapter(AdapterRecord("v9", (), "r1", "/x", "h", 0.0))
    open_round(ctx.store, make_spec("r2").model_copy(update={"parent_adapter": "v9"}), 0.0)


def test_get_round_spec_unknown(ctx: CoordinatorContext) -> None:
    e = error(handlers.get_round_spec, ctx, pb.GetRoundSpecRequest(round_id="zzz"))
    assert e.code is grpc.StatusCode.NOT_FOUND and "'zzz'" in e.message
    empty = CoordinatorContext(store=MemoryStore(), config=ctx.config)
    assert "no round exists yet" in error(handlers.get_round_spec, empty, pb.GetRoundSpecRequest()).message


def test_the_heartbeat_index_tracks_the_stores_progress(ctx: CoordinatorContext) -> None:
    """coordinator.progress follows heartbeats, joins, leaves and expiry exactly as round_progress reads them."""
    import random

    from coordinator.rounds import round_progress

    rng = random.Random(0)
    names = [f"p{i}" for i in range(6)]
    for n in names[:4]:
        join(ctx, n)
    samples = dict.fromkeys(names, 0)
    epochs = dict.fromkeys(names, 0)
    joined = set(names[:4])
    for _ in range(60):
        ctx.clock.now += rng.choice([0.5, 1.0, 4.0])  # type: ignore[attr-defined]
        action, name = rng.random(), rng.choice(names)
        if action < 0.1 and name not in joined:
            join(ctx, name)
            joined.add(name)
            samples[name] = epochs[name] = 0
        elif action < 0.15 and name in joined:
            leave(ctx, name)
            joined.discard(name)
        elif name in joined:
            samples[name] += rng.randint(0, 3)
            epochs[name] += rng.randint(0, 1)
            r = beat(ctx, name, samples[name], epoch=epochs[name])
            if not r.ok:
                joined.discard(name)
        record = ctx.store.get_round("r1")
        assert record is not None
        now = ctx.clock()
        assert ctx.progress.of(ctx.store, "r1").progress(record, now) == round_progress(ctx.store, record, now)
        if record.state.terminal or record.state is RoundState.FINALIZING:
            break
