"""A trainer's step notice ends the epoch at every span without waiting for a poll; an outsider's does nothing.

Real in-process span servers on real hivemind DHT nodes and the direct transport. Polling is turned off (an hour
between reads of the step records), so only notices move the replicas: the trainer's own span is woken in
process, the other span through ``rpc_closed``, which a roster that does not list the caller ignores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import peer.replica_group
from peer.inprocess import InProcessSwarm
from peer.roster_view import OPEN, Membership
from peer.trainer import ChainTrainer, Router
from swarm.span import load_trainer_head
from tests.integration.harness import tiny_spec, wait_for

pytestmark = pytest.mark.integration


class _Nobody(Membership):
    enforced = True

    def allows(self, peer_id: str, span: tuple[int, int] | None = None) -> bool:
        return False


@pytest.mark.timeout(180)
def test_a_step_notice_ends_the_epoch_and_an_outsiders_is_ignored(
    tiny_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer.replica_group, "FAST_POLL_S", 3600.0)
    monkeypatch.setattr(peer.replica_group, "SLOW_POLL_S", 3600.0)
    ckpt = tiny_checkpoint("llama", layers=4)
    spec = tiny_spec(ckpt, "notice", [0, 2, 4])
    swarm = InProcessSwarm(spec).start()
    try:
        local, remote = swarm.servers
        router = Router(swarm.dhts[0], spec, {spec.spans[0]: local}, timeout=30)
        trainer = ChainTrainer(spec, load_trainer_head(spec.base.path), router)
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        batches = iter([(i, torch.randint(4, vocab, (2, 16), generator=gen)) for i in range(8)])
        assert swarm.recorder is not None

        swarm.recorder.open(0)
        done = trainer.run_step(0, 2, batches, 1)
        swarm.recorder.close(0, [mb.index for mb in done], 4, next_step=1)
        time.sleep(3)  # step 0 is closed in the DHT, but nobody was told and nobody polls
        assert (local.epoch, remote.epoch) == (0, 0)

        remote.members = _Nobody()  # the trainer is not on this replica's roster: its notice is ignored
        router.notify_closed()
        wait_for(lambda: local.epoch == 1, 20, "the trainer's own span to end epoch 0 on the notice")
        time.sleep(3)
        assert remote.epoch == 0, "a notice from a caller the roster does not list woke the replica"

        remote.members = OPEN
        router.notify_closed()
        wait_for(lambda: remote.epoch == 1, 20, "the remote span to end epoch 0 on the notice")
        assert (local.epoch, remote.epoch) == (1, 1)
    finally:
        swarm.stop()
