"""Signed announcements of the spans this peer serves, and reading the swarm map back from the DHT."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.logging import get_logger

from peer.roster_view import OPEN, Membership
from swarm.dht_records import (
    ONLINE,
    RoundRecordsSchema,
    ServerAnnouncement,
    TrainerRecord,
    dht_prefix,
    parse_announcement,
    parse_trainer_record,
    servers_key,
    trainers_key,
)
from swarm.identity import PeerIdentity, bound_to_peer, dht_key_binding

log = get_logger(__name__)


def record_validators(round_id: str, private_key: RSAPrivateKey | None = None) -> list:
    """Validators every DHT node of a round installs: schema of its keys + per-peer signed subkeys.

    ``private_key`` signs our records (default: the process-wide key; several nodes in one process need their own).
    """
    return [SchemaValidator(RoundRecordsSchema, prefix=dht_prefix(round_id)), RSASignatureValidator(private_key)]


def _owned(round_id: str, subkey: Any, record: ServerAnnouncement | TrainerRecord | None) -> bool:
    """The record names the peer whose libp2p key signed the record's subkey (swarm.identity.dht_key_binding)."""
    return (
        record is not None
        and isinstance(subkey, bytes)
        and bound_to_peer(record.peer_id, round_id, subkey, record.identity_key, record.binding)
    )


def fetch_servers(dht: hivemind.DHT, round_id: str, members: Membership = OPEN) -> list[ServerAnnouncement]:
    """All valid, unexpired server announcements of a round by ``members`` for the span they announce (malformed
    ones, ones not signed in the name of the peer they name and ones the roster does not back are skipped)."""
    found = dht.get(servers_key(round_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    out = []
    for subkey, item in found.value.items():
        ann = parse_announcement(item.value)
        if ann is not None and _owned(round_id, subkey, ann) and members.allows(ann.peer_id, ann.span):
            out.append(ann)
    return out


def fetch_trainers(dht: hivemind.DHT, round_id: str, members: Membership = OPEN) -> list[TrainerRecord]:
    """All valid, unexpired trainer step records of a round by ``members`` (see swarm.steps); malformed ones and
    ones not signed in the name of the peer they name are skipped."""
    found = dht.get(trainers_key(round_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    records = ((subkey, parse_trainer_record(item.value)) for subkey, item in found.value.items())
    return [r for k, r in records if r is not None and _owned(round_id, k, r) and members.allows(r.peer_id)]


def replica_status(
    dht: hivemind.DHT, round_id: str, span: tuple[int, int], members: Membership = OPEN
) -> dict[str, tuple[int, int]]:
    """Peer id -> (announced epoch, last epoch whose all-reduce failed or -1) of the online servers of ``span``."""
    return {
        a.peer_id: (int(a.epoch), int(a.failed_epoch)) for a in online_servers(dht, round_id, members) if a.span == span
    }


def online_servers(dht: hivemind.DHT, round_id: str, members: Membership = OPEN) -> list[ServerAnnouncement]:
    """The round's servers that announce themselves as online (what routing and replica counts consider)."""
    return [a for a in fetch_servers(dht, round_id, members) if a.state == ONLINE]


def signing_binding(dht: hivemind.DHT, identity: PeerIdentity, round_id: str, subkey: bytes) -> dict[str, bytes]:
    """``identity``'s proof that it owns ``subkey`` in ``round_id``; ValueError unless it is ``dht``'s identity."""
    if identity.peer_id != str(dht.peer_id):
        raise ValueError(f"identity {identity.peer_id} is not the DHT node's ({dht.peer_id}): start the DHT with it")
    return dht_key_binding(identity, round_id, subkey)


class Announcer(threading.Thread):
    """Re-announces ``make_record()`` every ``period`` seconds; records expire after 3 periods.

    ``identity`` (the DHT node's libp2p key) signs the record's subkey, so readers know the record is this peer's.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        round_id: str,
        make_record: Callable[[], ServerAnnouncement],
        period: float,
        identity: PeerIdentity,
        private_key: RSAPrivateKey | None = None,
    ):
        super().__init__(name="announcer", daemon=True)
        self.dht, self.round_id, self.make_record, self.period = dht, round_id, make_record, period
        self.subkey = RSASignatureValidator(private_key).local_public_key  # the key the DHT node signs with
        self.binding = signing_binding(dht, identity, round_id, self.subkey)
        self._stop_event = threading.Event()

    def announce_once(self, expiration: float | None = None) -> bool:
        record = self.make_record()
        return bool(
            self.dht.store(
                servers_key(self.round_id),
                subkey=self.subkey,
                value={**record.dict(), **self.binding},
                expiration_time=expiration or get_dht_time() + 3 * self.period,
            )
        )

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.announce_once()
            except Exception:
                log.exception("announcement failed; retrying")
            self._stop_event.wait(self.period)

    def stop(self, leave: bool = True) -> None:
        """Stop announcing; ``leave`` replaces our record with one that expires right away."""
        self._stop_event.set()
        if leave:
            try:
                self.announce_once(expiration=get_dht_time() + 0.5)
            except Exception:
                log.warning("could not withdraw the DHT announcement; it expires by itself")
