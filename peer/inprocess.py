"""A span server wired to the DHT the way a daemon wires it, for peers sharing one process (tests, bench)."""

from __future__ import annotations

from functools import partial
from typing import Any

import hivemind
from hivemind.utils.crypto import RSAPrivateKey

from peer.announce import Announcer, fetch_trainers, replica_epochs
from peer.server import SpanServer
from swarm.config import RoundSpec, SpanRange
from swarm.steps import step_contents


def _announce(announcer: Announcer) -> None:
    announcer.announce_once()


def in_process_server(
    spec: RoundSpec, span: SpanRange, dht: hivemind.DHT, key: RSAPrivateKey, **kwargs: Any
) -> tuple[SpanServer, Announcer]:
    """A SpanServer reading the trainers' step records and the announced replica epochs, plus its announcer.

    Peers sharing one process sign their DHT records with their own ``key``. Nothing is started.
    """
    holder: dict[str, Announcer] = {}
    server = SpanServer(
        spec,
        span,
        dht,
        step_contents=lambda epoch: step_contents(fetch_trainers(dht, spec.round_id), epoch),
        replica_epochs=lambda: replica_epochs(dht, spec.round_id, (span.start, span.end)),
        announce=lambda: _announce(holder["announcer"]),
        **kwargs,
    )
    holder["announcer"] = Announcer(dht, spec.round_id, partial(server.announcement, 1.0), period=1.0, private_key=key)
    return server, holder["announcer"]
