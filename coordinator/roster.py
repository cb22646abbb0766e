"""The coordinator's hivemind DHT node and the signed roster it publishes there every few seconds.

The roster of the current round (see :mod:`swarm.roster` for its format) is stored under
``loraswarm_<round_id>_roster``, in the DHT node's own subkey (hivemind's ``RSASignatureValidator``: nobody
else can overwrite it), with an expiration of three publication periods, signed by the coordinator's Ed25519
key; peers read every subkey of it and trust the newest roster that passes :func:`swarm.roster.verify_roster`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.schema import SchemaValidator

from coordinator.context import CoordinatorContext
from coordinator.state import CoordinatorStore, MemberState, RoundRecord
from swarm.dht_records import RoundRecordsSchema, dht_prefix
from swarm.proto import NO_SPAN
from swarm.roster import ROSTER_FORMAT, roster_key, sign_roster

if TYPE_CHECKING:
    import hivemind

log = logging.getLogger(__name__)


def build_roster(store: CoordinatorStore, record: RoundRecord, now: float) -> dict[str, Any]:
    """The live members of ``record`` with their spans and throughput, plus the round's state and time."""
    spans = record.spec.spans
    peers = [
        {
            "peer_id": m.peer_id,
            "span": [spans[m.span_index].start, spans[m.span_index].end] if m.span_index != NO_SPAN else None,
            "throughput": m.throughput,
            "epoch": m.epoch,
            "multiaddrs": list(m.multiaddrs),
        }
        for m in store.list_members(record.round_id, MemberState.LIVE)
    ]
    return {
        "format": ROSTER_FORMAT,
        "round_id": record.round_id,
        "state": record.state.value,
        "time": now,
        "spans": [[s.start, s.end] for s in spans],
        "peers": peers,
    }


class RosterPublisher:
    """Stores the signed roster of the current round in the DHT; call :meth:`publish_once` periodically."""

    def __init__(self, ctx: CoordinatorContext, key: Ed25519PrivateKey, dht: hivemind.DHT, subkey: bytes) -> None:
        """``subkey``: the owner marker of the RSA key ``dht`` signs records with (coordinator.dht_node)."""
        self.ctx = ctx
        self.key = key
        self.dht = dht
        self.subkey = subkey
        self._schemas: set[str] = set()

    def publish_once(self) -> bool:
        from hivemind.utils import get_dht_time

        ctx = self.ctx
        with ctx.lock:
            record = ctx.store.current_round()
            if record is None:
                return False
            roster = build_roster(ctx.store, record, ctx.clock())
        value = sign_roster(roster, self.key)
        if record.round_id not in self._schemas:  # this node refuses subkey-less values for the roster key too
            self.dht.add_validators([SchemaValidator(RoundRecordsSchema, prefix=dht_prefix(record.round_id))])
            self._schemas.add(record.round_id)
        started = get_dht_time()
        expiration = started + 3 * ctx.config.roster_interval_s
        key = roster_key(record.round_id)
        ok = bool(self.dht.store(key, value, subkey=self.subkey, expiration_time=expiration))
        if not ok:  # hivemind reports False when any one replica refused, e.g. a duplicate store: read it back
            found = self.dht.get(key, latest=True)
            mine = found.value.get(self.subkey) if found is not None and isinstance(found.value, dict) else None
            ok = mine is not None and mine.value == value
        ctx.metrics.roster_publishes.labels(result="ok" if ok else "error").inc()
        if not ok:
            log.warning(
                "could not store the roster of round %s in the DHT (the store took %.1f s); retrying",
                record.round_id,
                get_dht_time() - started,
            )
        return ok
