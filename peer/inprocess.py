"""A span server wired to the DHT the way a daemon wires it, for peers sharing one process (tests, bench)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import hivemind
import torch
from hivemind.utils.crypto import RSAPrivateKey

from peer.announce import Announcer, fetch_trainers, record_validators, replica_status
from peer.server import SpanServer
from peer.step_records import StepRecorder
from peer.trainer import ChainTrainer
from swarm.config import RoundSpec, SpanRange
from swarm.steps import slots_per_step, step_contents


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
        replicas=lambda: replica_status(dht, spec.round_id, (span.start, span.end)),
        announce=lambda: _announce(holder["announcer"]),
        **kwargs,
    )
    holder["announcer"] = Announcer(dht, spec.round_id, partial(server.announcement, 1.0), period=1.0, private_key=key)
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
        keys = []
        for span in self.spec.spans:
            key = RSAPrivateKey()
            dht = hivemind.DHT(
                start=True,
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                initial_peers=self.dhts[0].get_visible_maddrs() if self.dhts else [],
                record_validators=record_validators(self.spec.round_id, key),
            )
            server, announcer = in_process_server(self.spec, span, dht, key)
            server.start(catch_up=False)
            announcer.start()
            self.dhts.append(dht)
            keys.append(key)
            self.servers.append(server)
            self.announcers.append(announcer)
        self.recorder = StepRecorder(self.dhts[0], self.spec.round_id, private_key=keys[0])
        return self

    def step(self, trainer: ChainTrainer, step: int, batches: Iterator[tuple[int, torch.Tensor]], depth: int) -> None:
        """One swarm-wide step: the trainer's whole share (every slot), published like a daemon's trainer does."""
        assert self.recorder is not None
        slots = slots_per_step(self.spec.optimizer.target_batch_size, self.spec.data.micro_batch_size)
        self.recorder.open(step)
        done = trainer.run_step(step, slots, batches, depth)
        self.recorder.close(step, [mb.index for mb in done], sum(len(mb.input_ids) for mb in done))

    def stop(self) -> None:
        if self.recorder is not None:
            self.recorder.finish()
        for announcer in self.announcers:
            announcer.stop(leave=False)
        for server in self.servers:
            server.shutdown()
        for dht in self.dhts:
            dht.shutdown()
