"""A peer's view of the coordinator's signed roster: who is a member of the round, and which span each hosts.

In a round with a coordinator the roster (:mod:`swarm.roster`) is the truth about membership. Anyone can write
DHT records, so a peer uses only what the roster backs:

- routers send micro-batches only to announced servers that the roster lists for that span;
- span servers answer forward / backward / eval only for callers the roster lists (libp2p authenticates the
  caller's peer id, so it cannot be claimed by another key);
- a replica uses an all-reduce result only when every member of the group is listed for its own span, counts
  and copies replicas only among the listed ones, and ends a step only on the step records of listed trainers.

A roster is used only after :func:`swarm.roster.verify_roster` (the coordinator's Ed25519 key, this round) and
only if it is newer than the one held (an older record replayed into the DHT changes nothing). When the
coordinator is unreachable the last verified roster stays in force. A round without a coordinator (a spec file
and a private swarm) has no roster: :data:`OPEN` admits everyone, as before.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hivemind.utils.logging import get_logger

from swarm.roster import RosterError, roster_key, verify_roster

log = get_logger(__name__)

Span = tuple[int, int]


class Membership:
    """Who may take part; the base class admits everyone (a round without a coordinator)."""

    enforced = False  # True where a roster decides (requests must then also name their caller as the trainer)

    def allows(self, peer_id: str, span: Span | None = None) -> bool:
        """``peer_id`` may take part (as a member of ``span`` when given)."""
        return True

    def wait_listed(self, peer_id: str, timeout: float) -> bool:
        """Block until ``peer_id`` is a member (at most ``timeout`` s); True when it is."""
        return True


OPEN = Membership()
#: the "span" of a trainer-only member (roster ``"span": null``): listed, so it is served and its step records
#: count, but it is no member of any span's replica group
TRAINER_ONLY: Span = (-1, -1)


def _parse_members(roster: dict[str, Any]) -> dict[str, Span]:
    members: dict[str, Span] = {}
    for entry in roster.get("peers", []):
        if not isinstance(entry, dict):
            continue
        peer_id, span = entry.get("peer_id"), entry.get("span")
        if isinstance(peer_id, str) and "span" in entry and span is None:
            members[peer_id] = TRAINER_ONLY
        elif (
            isinstance(peer_id, str)
            and isinstance(span, list)
            and len(span) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        ):
            members[peer_id] = (span[0], span[1])
    return members


#: subkeys of the roster key read per refresh (anyone may add subkeys: the latest-expiring are read)
MAX_ROSTER_CANDIDATES = 16


def roster_records(value: Any) -> list[Any]:
    """The roster records in a DHT value: the entries of the roster key's dictionary (each under its writer's
    subkey; the coordinator's is one of them), latest-expiring first; a bare record is its own candidate."""
    if value is None:
        return []
    if isinstance(value, dict) and not {"roster", "signature"} <= value.keys():
        entries = [v for v in value.values() if hasattr(v, "value") and hasattr(v, "expiration_time")]
        entries.sort(key=lambda v: v.expiration_time, reverse=True)
        return [v.value for v in entries[:MAX_ROSTER_CANDIDATES]]
    return [value]


class RosterView(Membership):
    """The latest verified roster of ``round_id`` read from the DHT; :meth:`refresh` reads it again.

    ``fetch`` returns the raw DHT value of the roster key (or None); ``max_age_s`` bounds how old a record may be
    when first seen (older ones are replays). Thread-safe.
    """

    enforced = True

    def __init__(
        self,
        fetch: Callable[[str], Any],
        round_id: str,
        public_key: Ed25519PublicKey,
        *,
        max_age_s: float = 120.0,
        min_refresh_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ):
        self.fetch, self.round_id, self.public_key = fetch, round_id, public_key
        self.max_age_s, self.min_refresh_s, self.clock = max_age_s, min_refresh_s, clock
        self._lock = threading.Lock()
        self._members: dict[str, Span] = {}
        self._time = -math.inf
        self._last_refresh = -math.inf
        self._said = ""
        self.refused = 0  # records that failed verification (forged, other round, stale)

    @classmethod
    def from_dht(cls, dht: Any, round_id: str, public_key: Ed25519PublicKey, **kwargs: Any) -> RosterView:
        def fetch(key: str) -> Any:
            found = dht.get(key, latest=True)
            return None if found is None else found.value

        return cls(fetch, round_id, public_key, **kwargs)

    @property
    def known(self) -> bool:
        """A verified roster has been read."""
        return self._time > -math.inf

    @property
    def roster_time(self) -> float:
        return self._time

    def members(self, span: Span | None = None) -> frozenset[str]:
        with self._lock:
            return frozenset(p for p, s in self._members.items() if span is None or s == span)

    def span_of(self, peer_id: str) -> Span | None:
        with self._lock:
            return self._members.get(peer_id)

    def refresh(self) -> bool:
        """Read the roster from the DHT; True when a newer verified roster was taken."""
        self._last_refresh = time.monotonic()
        try:
            value = self.fetch(roster_key(self.round_id))
        except Exception as exc:  # DHT shutting down or unreachable: keep the last roster
            self._say(f"could not read the roster of round {self.round_id}: {exc!r}")
            return False
        newest: dict[str, Any] | None = None
        for candidate in roster_records(value):
            try:
                roster = verify_roster(candidate, self.public_key, round_id=self.round_id, max_age_s=self.max_age_s,
                                       now=self.clock())  # fmt: skip
            except RosterError as exc:
                self.refused += 1
                self._say(f"refused a roster record of round {self.round_id}: {exc}")
                continue
            if newest is None or float(roster["time"]) > float(newest["time"]):
                newest = roster
        if newest is None:
            return False
        roster = newest
        stamp = float(roster["time"])
        with self._lock:
            if stamp <= self._time:  # the same record again, or an older one replayed
                return False
            self._members, self._time = _parse_members(roster), stamp
        return True

    def _say(self, message: str) -> None:
        if message != self._said:
            log.warning(message)
            self._said = message

    def allows(self, peer_id: str, span: Span | None = None) -> bool:
        """``peer_id`` is listed (for ``span`` when given); an unknown caller triggers one rate-limited re-read
        (it may have joined since the last read)."""
        found = self.span_of(peer_id)
        if found is None and time.monotonic() - self._last_refresh >= self.min_refresh_s:
            self.refresh()
            found = self.span_of(peer_id)
        return found is not None and (span is None or found == span)

    def wait_listed(self, peer_id: str, timeout: float, period: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.span_of(peer_id) is not None or (self.refresh() and self.span_of(peer_id) is not None):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(period)


class RosterRefresher(threading.Thread):
    """Re-reads a :class:`RosterView` every ``period`` seconds until stopped."""

    def __init__(self, view: RosterView, period: float):
        super().__init__(name="roster", daemon=True)
        self.view, self.period = view, period
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.view.refresh()

    def stop(self) -> None:
        self._stop_event.set()
