"""A span server wired to the DHT the way a daemon wires it, for peers sharing one process (tests, bench)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import hivemind
import torch
from hivemind.utils.crypto import RSAPrivateKey

from peer.announce import Announcer, fetch_trainers, record_validators, replica_status
from peer.server import SpanServer
from peer.step_records import StepRecorder
from peer.trainer import ChainTrainer
from swarm.config import RoundSpec, SpanRange
from swarm.identity import PeerIdentity, load_identity
from swarm.steps import slots_per_step, step_contents


def _import_multiaddr_codecs() -> None:
    """Import every multiaddr codec now, before forking DHT processes from a process whose other threads may be
    importing: hivemind imports codecs lazily, and a child forked while a module lock was held fails to import
    (CPython: ``KeyError`` in ``_ModuleLock.acquire``), seen as a failing ``get_visible_maddrs``."""
    from hivemind.utils.multiaddr.codecs import codec_by_name
    from hivemind.utils.multiaddr.protocols import PROTOCOLS

    for protocol in PROTOCOLS:
        codec_by_name(protocol.codec)


def _announce(announcer: Announcer) -> None:
    announcer.announce_once()


@dataclass
class InProcessNode:
    """One peer's DHT node in a shared process: its own libp2p identity (a key file) and DHT record key."""

    dht: hivemind.DHT
    key: RSAPrivateKey
    identity: PeerIdentity

    @classmethod
    def start(cls, round_id: str, initial_peers: Sequence[Any] = ()) -> InProcessNode:
        _import_multiaddr_codecs()
        path = Path(tempfile.mkdtemp(prefix="loraswarm-id-")) / "identity.key"  # hivemind writes a new identity
        key = RSAPrivateKey()
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=list(initial_peers),
                           identity_path=str(path), record_validators=record_validators(round_id, key))  # fmt: skip
        return cls(dht, key, load_identity(path))

    @property
    def peer_id(self) -> str:
        return str(self.dht.peer_id)


def in_process_server(
    spec: RoundSpec, span: SpanRange, node: InProcessNode, **kwargs: Any
) -> tuple[SpanServer, Announcer]:
    """A SpanServer reading the trainers' step records and the announced replica epochs, plus its announcer.

    Peers sharing one process sign their DHT records with their own node's keys. Nothing is started.
    """
    holder: dict[str, Announcer] = {}
    dht = node.dht
    server = SpanServer(
        spec,
        span,
        dht,
        step_contents=lambda epoch: step_contents(fetch_trainers(dht, spec.round_id), epoch),
        replicas=lambda: replica_status(dht, spec.round_id, (span.start, span.end)),
        announce=lambda: _announce(holder["announcer"]),
        **kwargs,
    )
    holder["announcer"] = Announcer(dht, spec.round_id, partial(server.announcement, 1.0), period=1.0,
                                    identity=node.identity, private_key=node.key)  # fmt: skip
    return server, holder["announcer"]


@dataclass
class InProcessSwarm:
    """One in-process peer per span (own DHT node, key, span server, announcer) and a trainer's step recorder on
    the first; the trainer (hosting span 0) runs whole swarm-wide steps with :meth:`step`."""

    spec: RoundSpec
    dhts: list[hivemind.DHT] = field(default_factory=list)
    servers: list[SpanServer] = field(default_factory=list)
    announcers: list[Announcer] = field(default_factory=list)
    recorder: StepRecorder | None = None

    def start(self) -> InProcessSwarm:
        nodes = []
        for span in self.spec.spans:
            node = InProcessNode.start(self.spec.round_id, self.dhts[0].get_visible_maddrs() if self.dhts else [])
            server, announcer = in_process_server(self.spec, span, node)
            server.start(catch_up=False)
            announcer.start()
            nodes.append(node)
            self.dhts.append(node.dht)
            self.servers.append(server)
            self.announcers.append(announcer)
        self.recorder = StepRecorder(self.dhts[0], self.spec.round_id, nodes[0].identity, private_key=nodes[0].key)
        return self

    def step(self, trainer: ChainTrainer, step: int, batches: Iterator[tuple[int, torch.Tensor]], depth: int) -> None:
        """One swarm-wide step: the trainer's whole share (every slot), published like a daemon's trainer does."""
        assert self.recorder is not None
        slots = slots_per_step(self.spec.optimizer.target_batch_size, self.spec.data.micro_batch_size)
        self.recorder.open(step)  # already open when the previous step's close opened it
        done = trainer.run_step(step, slots, batches, depth)
        samples = sum(len(mb.input_ids) for mb in done)
        self.recorder.close(step, [mb.index for mb in done], samples, next_step=step + 1)  # one store, as a daemon
        trainer.router.notify_closed()

    def stop(self) -> None:
        if self.recorder is not None:
            self.recorder.finish()
        for announcer in self.announcers:
            announcer.stop(leave=False)
        for server in self.servers:
            server.shutdown()
        for dht in self.dhts:
            dht.shutdown()
