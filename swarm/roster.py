"""The coordinator's signed roster of a round, as stored in the hivemind DHT.

Every few seconds the coordinator stores, under :func:`roster_key` and its DHT node's own signed subkey, a
value ``{"roster": <json text>, "signature": <hex Ed25519 signature of the json bytes>}``
(:class:`~swarm.dht_records.SignedRoster`). Anyone can read it; a peer trusts it only after
:func:`verify_roster` with the coordinator's public key (given out of band): the signature is what protects
its content, the owner-signed subkey keeps others from overwriting or shadowing it (see
:class:`~swarm.dht_records.RoundRecordsSchema`). The JSON is canonical (sorted keys, compact, ASCII), so
signing is deterministic. Roster fields (readers ignore ones they do not know)::

    {"format": 1, "round_id": "r1", "state": "training", "time": 1700000000.0,
     "spans": [[0, 2], [2, 4]],
     "peers": [{"peer_id": "...", "span": [0, 2], "throughput": 12.5, "epoch": 3, "multiaddrs": [...]}]}

A trainer-only member (``swarm peer --trainer-only``) is listed with ``"span": null``: peers serve it and count its
step records, but it belongs to no span's replica group.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm.dht_records import dht_prefix
from swarm.keys import public_key_fingerprint, sign_hex, verify_hex

ROSTER_FORMAT = 1

__all__ = [
    "ROSTER_FORMAT",
    "RosterError",
    "roster_json",
    "roster_key",
    "sign_roster",
    "verify_roster",
]


class RosterError(ValueError):
    """A roster record that is malformed, forged, for another round, or too old."""


def roster_key(round_id: str) -> str:
    """DHT key of a round's roster: ``loraswarm_<round_id>_roster``."""
    return f"{dht_prefix(round_id)}_roster"


def roster_json(roster: dict[str, Any]) -> str:
    """Canonical JSON of ``roster``: the exact text that is signed."""
    return json.dumps(roster, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sign_roster(roster: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, str]:
    """The DHT value for ``roster``: its canonical JSON and the hex Ed25519 signature of those bytes."""
    text = roster_json(roster)
    return {"roster": text, "signature": sign_hex(key, text.encode("ascii"))}


def verify_roster(
    value: object,
    public_key: Ed25519PublicKey,
    *,
    round_id: str | None = None,
    max_age_s: float | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a roster value read from the DHT and return the roster dict.

    Raises :class:`RosterError` naming the failed check: not a ``{"roster", "signature"}`` dict, bad
    signature (forged or garbled, or signed by another key), not a JSON object, another round than
    ``round_id``, or a ``time`` older than ``max_age_s`` seconds before ``now`` (a replayed record).
    """
    if not isinstance(value, dict) or set(value) != {"roster", "signature"}:
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise RosterError(f"malformed roster record: expected a dict with 'roster' and 'signature', got {keys}")
    text, signature = value["roster"], value["signature"]
    if not isinstance(text, str) or not isinstance(signature, str):
        raise RosterError("malformed roster record: 'roster' and 'signature' must be strings")
    try:
        data = text.encode("ascii")
        valid = verify_hex(public_key, data, signature)
    except (UnicodeEncodeError, ValueError) as e:
        raise RosterError(f"roster signature invalid: {e}") from None
    if not valid:
        raise RosterError(
            "roster signature invalid: the record was forged or modified, or not signed by the coordinator key "
            f"with fingerprint {public_key_fingerprint(public_key)}"
        )
    try:
        roster = json.loads(text)
    except json.JSONDecodeError as e:
        raise RosterError(f"malformed roster: signed text is not JSON ({e})") from None
    if not isinstance(roster, dict):
        raise RosterError("malformed roster: signed text is not a JSON object")
    if round_id is not None and roster.get("round_id") != round_id:
        raise RosterError(f"roster is for round {roster.get('round_id')!r}, not {round_id!r}")
    if max_age_s is not None:
        stamp = roster.get("time")
        if not isinstance(stamp, int | float) or not math.isfinite(stamp):
            raise RosterError("malformed roster: 'time' must be a number")
        age = (time.time() if now is None else now) - stamp
        if age > max_age_s:
            raise RosterError(f"roster is {age:.0f} s old (more than {max_age_s:g} s): stale or replayed")
    return roster
