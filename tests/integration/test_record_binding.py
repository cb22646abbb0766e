"""A DHT record counts only in the name of the peer whose libp2p key signed its subkey (swarm.identity).

hivemind signs each record with an RSA key of the writer's choosing (the subkey's owner); without the binding, any
DHT node could announce a server or publish a trainer's step record in another peer's name (its peer id is
public). Real hivemind DHT nodes in one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from peer.announce import Announcer, fetch_servers, fetch_trainers
from peer.inprocess import InProcessNode
from peer.step_records import StepRecorder
from swarm.dht_records import ServerAnnouncement, TrainerRecord, servers_key, trainers_key
from swarm.identity import dht_key_binding
from tests.integration.harness import wait_for

pytestmark = pytest.mark.integration
ROUND = "binding"


@pytest.fixture
def nodes() -> Iterator[tuple[InProcessNode, InProcessNode]]:
    honest = InProcessNode.start(ROUND)
    attacker = InProcessNode.start(ROUND, honest.dht.get_visible_maddrs())
    try:
        yield honest, attacker
    finally:
        attacker.dht.shutdown()
        honest.dht.shutdown()


@pytest.mark.timeout(120)
def test_records_in_another_peers_name_are_ignored(nodes: tuple[InProcessNode, InProcessNode]) -> None:
    honest, attacker = nodes
    victim = honest.peer_id
    real = ServerAnnouncement(peer_id=victim, span_start=0, span_end=2, throughput=1.0, epoch=3)
    Announcer(
        honest.dht, ROUND, lambda: real, period=1.0, identity=honest.identity, private_key=honest.key
    ).announce_once()
    recorder = StepRecorder(honest.dht, ROUND, honest.identity, private_key=honest.key)
    recorder.open(4)

    subkey = RSASignatureValidator(attacker.key).local_public_key
    own = dht_key_binding(attacker.identity, ROUND, subkey)  # the attacker's own key: derives its own peer id
    copied = dht_key_binding(honest.identity, ROUND, RSASignatureValidator(honest.key).local_public_key)
    forged = real.copy(update={"epoch": 10**6, "span_start": 2, "span_end": 4}).dict()
    for i, extra in enumerate(({}, own, copied)):  # unbound, bound to the attacker, the victim's binding replayed
        value = {**forged, **extra}
        attacker.dht.store(servers_key(ROUND), subkey=subkey, value=value, expiration_time=get_dht_time() + 60)
        step = TrainerRecord(peer_id=victim, step=10**6, closed=True, **extra).dict()
        attacker.dht.store(trainers_key(ROUND), subkey=subkey, value=step, expiration_time=get_dht_time() + 60)
        wait_for(lambda: len(attacker.dht.get(servers_key(ROUND), latest=True).value) == 2, 20, f"forgery {i} stored")
        servers = fetch_servers(attacker.dht, ROUND)
        assert [(s.peer_id, s.epoch, s.span) for s in servers] == [(victim, 3, (0, 2))], (i, servers)
        trainers = fetch_trainers(attacker.dht, ROUND)
        assert [(t.peer_id, t.step) for t in trainers] == [(victim, 4)], (i, trainers)

    # the attacker's records in its own name are read (the roster then decides whether it is a member)
    attacker.dht.store(servers_key(ROUND), subkey=subkey, value={**forged, "peer_id": attacker.peer_id, **own},
                       expiration_time=get_dht_time() + 60)  # fmt: skip
    wait_for(lambda: attacker.peer_id in {s.peer_id for s in fetch_servers(honest.dht, ROUND)}, 20, "its own record")
    recorder.finish()


@pytest.mark.timeout(120)
def test_the_roster_cannot_be_shadowed_by_a_far_expiring_record(nodes: tuple[InProcessNode, InProcessNode]) -> None:
    """The coordinator's roster lives under its node's own subkey; a forged or replayed roster with a far
    expiration, stored by another node (as a plain value, or under the attacker's subkey), hides nothing."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from peer.roster_view import RosterView
    from swarm.roster import roster_key, sign_roster

    publisher, attacker = nodes
    coordinator_key = Ed25519PrivateKey.generate()
    key = roster_key(ROUND)
    mine, theirs = (RSASignatureValidator(n.key).local_public_key for n in (publisher, attacker))

    def roster(t: float, peer: str, signer: Ed25519PrivateKey = coordinator_key) -> dict[str, str]:
        body = {"format": 1, "round_id": ROUND, "state": "training", "time": t, "spans": [[0, 2]],
                "peers": [{"peer_id": peer, "span": [0, 2], "throughput": 1.0, "epoch": 0, "multiaddrs": []}]}  # fmt: skip
        return sign_roster(body, signer)

    now = time.time()
    old = roster(now - 5, "old-member")
    publisher.dht.store(key, old, subkey=mine, expiration_time=get_dht_time() + 30)
    far = get_dht_time() + 10**6
    assert not attacker.dht.store(key, roster(now + 60, "forged", Ed25519PrivateKey.generate()), expiration_time=far)
    attacker.dht.store(
        key, roster(now + 60, "forged", Ed25519PrivateKey.generate()), subkey=theirs, expiration_time=far
    )
    attacker.dht.store(key, old, subkey=theirs, expiration_time=far)  # a genuine older roster, replayed
    publisher.dht.store(key, roster(now, "member"), subkey=mine, expiration_time=get_dht_time() + 30)

    view = RosterView.from_dht(attacker.dht, ROUND, coordinator_key.public_key())
    wait_for(lambda: view.refresh() or view.known and view.members() == frozenset({"member"}), 20, "the new roster")
    assert view.members() == frozenset({"member"})
