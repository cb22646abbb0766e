"""Signed roster: sign / verify, forged and garbled records, the DHT schema, and what the coordinator puts in it."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.roster import build_roster
from coordinator.state import Capacity, MemberRecord, MemberState, RoundRecord
from coordinator.store_memory import MemoryStore
from swarm.config import BaseModelRef, RoundSpec, split_even
from swarm.roster import RosterError, roster_key, sign_roster, verify_roster

pytestmark = pytest.mark.timeout(30)

KEY = Ed25519PrivateKey.generate()
ROSTER = {"format": 1, "round_id": "r1", "state": "training", "time": 100.0, "spans": [[0, 2], [2, 4]],
          "peers": [{"peer_id": "a", "span": [0, 2], "throughput": 1.5, "epoch": 2, "multiaddrs": []}]}  # fmt: skip


def test_sign_and_verify_round_trip() -> None:
    value = sign_roster(ROSTER, KEY)
    assert set(value) == {"roster", "signature"} and len(value["signature"]) == 128
    assert sign_roster(dict(reversed(list(ROSTER.items()))), KEY) == value  # canonical: key order does not matter
    assert verify_roster(value, KEY.public_key(), round_id="r1", max_age_s=10, now=105.0) == ROSTER
    assert roster_key("r1") == "loraswarm_r1_roster"


@pytest.mark.parametrize(
    ("tamper", "message"),
    [(lambda v: {**v, "roster": v["roster"].replace('"a"', '"evil"')}, "signature invalid"),
     (lambda v: sign_roster(ROSTER, Ed25519PrivateKey.generate()), "not signed by the coordinator key"),
     (lambda v: {**v, "signature": "zz" * 64}, "not hex"),
     (lambda v: {**v, "signature": v["signature"][:10]}, "64 bytes"),
     (lambda v: {"roster": v["roster"]}, "malformed roster record"),
     (lambda v: [v["roster"], v["signature"]], "malformed roster record"),
     (lambda v: {**v, "extra": 1}, "malformed roster record"),
     (lambda v: {**v, "roster": 5}, "must be strings"),
     (lambda v: {**v, "roster": "h\u00e9"}, "signature invalid")],
)  # fmt: skip
def test_forged_or_garbled_records_are_refused(tamper, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RosterError, match=message):
        verify_roster(tamper(sign_roster(ROSTER, KEY)), KEY.public_key())


def test_wrong_round_stale_and_non_object_rosters() -> None:
    value = sign_roster(ROSTER, KEY)
    with pytest.raises(RosterError, match="for round 'r1', not 'r2'"):
        verify_roster(value, KEY.public_key(), round_id="r2")
    with pytest.raises(RosterError, match="stale or replayed"):
        verify_roster(value, KEY.public_key(), max_age_s=10, now=200.0)
    listed = {"roster": "[1]", "signature": KEY.sign(b"[1]").hex()}
    with pytest.raises(RosterError, match="not a JSON object"):
        verify_roster(listed, KEY.public_key())


def test_peers_dht_validators_accept_the_roster_only_under_a_subkey() -> None:
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.protocol import DHTProtocol
    from hivemind.dht.routing import DHTID
    from hivemind.dht.schema import SchemaValidator
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer

    from swarm.dht_records import RoundRecordsSchema, dht_prefix

    validator = SchemaValidator(RoundRecordsSchema, prefix=dht_prefix("r1"))

    def record(value: object, subkey: bytes = DHTProtocol.IS_REGULAR_VALUE) -> DHTRecord:
        return DHTRecord(key=DHTID.generate(source=roster_key("r1")).to_bytes(), subkey=subkey,
                         value=MSGPackSerializer.dumps(value), expiration_time=1e10)  # fmt: skip

    owner = RSASignatureValidator().local_public_key  # the coordinator node's subkey
    assert validator.validate(record(sign_roster(ROSTER, KEY), MSGPackSerializer.dumps(owner)))
    # a subkey-less value would replace the whole dictionary (every subkey) on a node if it expired later: refused
    assert not validator.validate(record(sign_roster(ROSTER, KEY)))
    assert not validator.validate(record({"roster": 1}, MSGPackSerializer.dumps(owner)))  # not a signed roster


def test_build_roster_lists_live_members_with_their_spans() -> None:
    store = MemoryStore()
    spec = RoundSpec(round_id="r1", base=BaseModelRef(path="/m", num_layers=4), spans=split_even(4, 2))
    store.create_round(RoundRecord.new(spec, 1.0))
    for peer, span, state in (("a", 0, MemberState.LIVE), ("b", 1, MemberState.LIVE), ("c", 1, MemberState.DEAD)):
        store.put_member(MemberRecord("r1", peer, span, ("/ip4/127.0.0.1/tcp/1",), Capacity(), 2.0, state=state))
    roster = build_roster(store, store.get_round("r1"), 50.0)  # type: ignore[arg-type]
    assert roster["round_id"] == "r1" and roster["state"] == "open" and roster["time"] == 50.0
    assert [(p["peer_id"], p["span"]) for p in roster["peers"]] == [("a", [0, 2]), ("b", [2, 4])]
    assert verify_roster(sign_roster(roster, KEY), KEY.public_key()) == roster
