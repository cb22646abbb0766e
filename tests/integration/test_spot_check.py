"""A span server that returns wrong activations is caught by the trainer's spot checks, reported and failed over.

Real in-process span servers on real hivemind DHT nodes (transport, announcements): the trainer hosts span 0-2;
span 2-4 has three replicas, one hostile (its forward answers activations x3: right shape, finite, wrong). With
every forward checked, each micro-batch goes through, the hostile replica is named whether it answered first or
was a checker, and no honest replica is.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import hivemind
import pytest
import torch

from peer.inprocess import InProcessNode, InProcessSwarm
from peer.server import SpanServer
from peer.trainer import ChainTrainer, MicroBatch, Router
from swarm.span import load_trainer_head
from tests.integration.harness import in_process_server, tiny_spec, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
def test_a_server_with_wrong_activations_is_outvoted_reported_and_failed_over(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    ckpt = tiny_checkpoint("llama", layers=4)
    spec = tiny_spec(ckpt, "spot", [0, 2, 4], tbs=64)
    swarm = InProcessSwarm(spec).start()  # span 0-2 (the trainer's) and one honest replica of 2-4
    extra: list[tuple[SpanServer, object, hivemind.DHT]] = []
    try:
        for _ in range(2):  # a second honest replica, then the hostile one
            node = InProcessNode.start(spec.round_id, swarm.dhts[0].get_visible_maddrs())
            server, announcer = in_process_server(spec, spec.spans[1], node)
            server.start(catch_up=False)
            announcer.start()
            extra.append((server, announcer, node.dht))
        hostile = extra[1][0]
        honest_forward = hostile.forward
        hostile.forward = lambda step, key, hidden: honest_forward(step, key, hidden) * 3  # type: ignore[method-assign]
        honest = {swarm.servers[1].peer_id, extra[0][0].peer_id}

        caught: dict[str, str] = {}
        outcomes: list[str] = []
        router = Router(swarm.dhts[0], spec, {spec.spans[0]: swarm.servers[0]}, timeout=30, rng=random.Random(1))
        wait_for(lambda: router.refresh(force=True) or router.peers_seen().get("2-4") == 3, 30, "three replicas")
        trainer = ChainTrainer(spec, load_trainer_head(spec.base.path), router, spot_check_rate=1.0,
                               on_bad_output=caught.__setitem__, rng=random.Random(2),
                               on_spot_check=outcomes.append)  # fmt: skip
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        for i in range(8):
            ids = torch.randint(0, vocab, (2, 16))
            result = trainer.microbatch(0, MicroBatch(i, i, ids))
            assert torch.isfinite(torch.tensor(result.loss))
        assert hostile.peer_id in caught, f"the hostile replica was not named: {caught}"
        assert not honest & caught.keys(), f"an honest replica was named: {caught}"
        assert "spot check" in caught[hostile.peer_id]
        assert trainer.disagreements == 0 and "undecided" not in outcomes
        assert "outvoted" in outcomes and "agree" in outcomes, outcomes  # once banned, the hostile is not asked
    finally:
        for server, announcer, dht in extra:
            announcer.stop(leave=False)  # type: ignore[attr-defined]
            server.shutdown()
            dht.shutdown()
        swarm.stop()
