"""A peer's view of the signed roster: only verified, newer rosters count; members are per span."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.roster_view import OPEN, RosterView
from swarm.roster import roster_key, sign_roster

pytestmark = pytest.mark.timeout(30)

KEY = Ed25519PrivateKey.generate()


def _roster(time: float, peers: dict[str, list[int]], round_id: str = "r1") -> dict[str, Any]:
    entries = [{"peer_id": p, "span": s, "throughput": 1.0, "epoch": 0, "multiaddrs": []} for p, s in peers.items()]
    return {"format": 1, "round_id": round_id, "state": "training", "time": time, "spans": [[0, 2], [2, 4]],
            "peers": entries}  # fmt: skip


class FakeDHT:
    """Holds the one value a test puts under the roster key (the real DHT is exercised by the swarm tests)."""

    def __init__(self) -> None:
        self.value: Any = None
        self.reads = 0

    def fetch(self, key: str) -> Any:
        assert key == roster_key("r1")
        self.reads += 1
        return self.value


def _view(dht: FakeDHT, now: float = 1000.0, **kwargs: Any) -> RosterView:
    return RosterView(dht.fetch, "r1", KEY.public_key(), clock=lambda: now, **kwargs)


def test_members_per_span_from_a_verified_roster() -> None:
    dht = FakeDHT()
    view = _view(dht)
    assert not view.known and not view.allows("a")
    dht.value = sign_roster(_roster(999.0, {"a": [0, 2], "b": [2, 4]}), KEY)
    assert view.refresh() and view.known
    assert view.members() == {"a", "b"} and view.members((0, 2)) == {"a"}
    assert view.allows("a") and view.allows("a", (0, 2)) and not view.allows("a", (2, 4))
    assert not view.allows("stranger")
    assert OPEN.allows("stranger", (0, 2)) and not OPEN.enforced and view.enforced


def test_a_trainer_only_member_is_served_but_in_no_replica_group() -> None:
    dht = FakeDHT()
    view = _view(dht)
    roster = _roster(999.0, {"a": [0, 2], "t": None})  # type: ignore[dict-item]
    roster["peers"].append({"peer_id": "no-span-key", "throughput": 1.0})  # "span" missing: not a trainer entry
    dht.value = sign_roster(roster, KEY)
    assert view.refresh()
    assert view.allows("t") and view.members() == {"a", "t"}  # span servers answer it, its step records count
    assert not view.allows("t", (0, 2)) and not view.allows("t", (2, 4)) and view.members((0, 2)) == {"a"}
    assert view.wait_listed("t", timeout=0.1) and not view.allows("no-span-key")


@pytest.mark.parametrize(
    "value",
    [
        sign_roster(_roster(999.0, {"evil": [0, 2]}), Ed25519PrivateKey.generate()),  # another key
        sign_roster(_roster(999.0, {"evil": [0, 2]}, round_id="r0"), KEY),  # another round
        sign_roster(_roster(1.0, {"evil": [0, 2]}), KEY),  # too old: a replay
        {"roster": "{}", "signature": "00"},
        "garbage",
    ],
)
def test_forged_foreign_and_stale_rosters_change_nothing(value: Any) -> None:
    dht = FakeDHT()
    view = _view(dht)
    dht.value = sign_roster(_roster(990.0, {"a": [0, 2]}), KEY)
    assert view.refresh()
    dht.value = value
    assert not view.refresh()
    assert view.members() == {"a"} and view.refused == 1


def test_an_older_roster_replayed_after_a_newer_one_is_ignored() -> None:
    dht = FakeDHT()
    view = _view(dht)
    old = sign_roster(_roster(990.0, {"a": [0, 2], "gone": [2, 4]}), KEY)
    dht.value = sign_roster(_roster(995.0, {"a": [0, 2]}), KEY)
    assert view.refresh()
    dht.value = old
    assert not view.refresh()
    assert view.members() == {"a"} and view.roster_time == 995.0


def test_an_unknown_caller_triggers_one_rate_limited_reread() -> None:
    dht = FakeDHT()
    view = _view(dht, min_refresh_s=60.0)
    dht.value = sign_roster(_roster(990.0, {"a": [0, 2]}), KEY)
    view.refresh()
    dht.value = sign_roster(_roster(991.0, {"a": [0, 2], "new": [2, 4]}), KEY)
    reads = dht.reads
    assert not view.allows("new")  # read moments ago: no re-read yet
    assert dht.reads == reads
    view = _view(dht, min_refresh_s=0.0)
    assert view.allows("new", (2, 4))  # a member that joined since the last read is admitted after a re-read


def test_wait_listed_returns_when_listed_and_times_out_otherwise() -> None:
    dht = FakeDHT()
    view = _view(dht)
    assert not view.wait_listed("a", timeout=0.3, period=0.05)
    dht.value = sign_roster(_roster(999.0, {"a": [0, 2]}), KEY)
    assert view.wait_listed("a", timeout=1.0, period=0.05)
