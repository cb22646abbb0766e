"""Who is expelled when members accuse one another (coordinator/accusations.py, pure functions)."""

from __future__ import annotations

import pytest

from coordinator.accusations import Accusations, parse, quorum, verdicts
from coordinator.state import MemberRecord, MemberState
from coordinator.validation import HandlerError
from swarm.proto import coordinator_pb2 as pb

pytestmark = pytest.mark.timeout(10)


def member(peer: str, span: int, state: MemberState = MemberState.LIVE) -> MemberRecord:
    return MemberRecord("r1", peer, span, state=state)


def test_quorum_is_two_or_a_strict_majority_of_the_other_replicas() -> None:
    small = [member("a", 0), member("b", 0)]
    assert quorum(small, small[0]) == 2  # one replica alone never removes its only partner
    five = [member(p, 0) for p in "abcde"] + [member("x", 0, MemberState.DEAD)]
    assert quorum(five, five[0]) == 3  # 4 live others -> 3


def test_a_quorum_of_live_members_expels_one_accuser_does_not() -> None:
    members = [member("a", 0), member("b", 0), member("c", 0), member("t", 1), member("gone", 0, MemberState.DEAD)]
    table = Accusations()
    table.update("r1", "b", {"a": "gradient norm 62 is 100x the group's median 0.6"})
    assert verdicts(members, table.against("r1")) == []  # one accuser
    table.update("r1", "gone", {"a": "x"})
    assert verdicts(members, table.against("r1")) == []  # a dead member's accusation does not count
    table.update("r1", "t", {"a": "rpc_forward bad output (non-finite)"})
    [out] = verdicts(members, table.against("r1"))
    assert out.peer_id == "a" and out.state is MemberState.EXPELLED
    assert out.removed_reason.startswith("accused by 2 members (b: gradient norm 62") and "t: rpc_forward" in (
        out.removed_reason
    )
    assert table.update("r1", "b", {}) and verdicts(members, table.against("r1")) == []  # withdrawn
    assert not table.update("r1", "b", {})  # unchanged


def test_parse_bounds_accusations() -> None:
    assert parse("me", [pb.Accusation(peer_id="a", reason="r" * 999)]) == {"a": "r" * 256}
    assert parse("me", [pb.Accusation(peer_id="a")]) == {"a": "no reason given"}
    with pytest.raises(HandlerError, match="cannot accuse itself"):
        parse("me", [pb.Accusation(peer_id="me", reason="x")])
    with pytest.raises(HandlerError, match="at most 16"):
        parse("me", [pb.Accusation(peer_id=f"p{i}", reason="x") for i in range(17)])
    with pytest.raises(HandlerError, match=r"accusations\[0\].peer_id"):
        parse("me", [pb.Accusation(peer_id="not a name!", reason="x")])


def test_only_the_current_round_is_kept() -> None:
    table = Accusations()
    table.update("r1", "b", {"a": "x"})
    table.update("r2", "c", {"d": "y"})
    assert table.against("r1") == {} and table.against("r2") == {"d": {"c": "y"}}
