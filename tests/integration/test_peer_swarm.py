"""4 real peer processes, 2 spans x 2 replicas, 2 trainers: loss drops and replicas stay identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.harness import Peer, assert_replicas_agree_every_epoch, make_spec, save_spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(420)
def test_two_spans_two_replicas_two_trainers(tmp_path: Path, demo_base: Path, demo_data: Path) -> None:
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "swarm4", [0, 2, 4], epochs=5))
    train = str(demo_data / "train.jsonl")
    peers: list[Peer] = []
    try:
        # Servers first, so that every span group is complete before the trainers start.
        peers.append(Peer(tmp_path, "s0", spec_path, ["--span-index", "0"]))
        bootstrap = ["--initial-peers", peers[0].ready()["maddrs"][0]]
        peers.append(Peer(tmp_path, "s1", spec_path, ["--span-index", "1", *bootstrap]))
        peers[1].ready()
        for i in (0, 1):
            args = [
                "--span-index",
                str(i),
                "--data",
                train,
                "--shard-index",
                str(i),
                "--num-shards",
                "2",
                "--min-replicas",
                "2",
            ]  # start together, once every span group is complete
            peers.append(Peer(tmp_path, f"t{i}", spec_path, [*args, *bootstrap]))
        trainers = peers[2:]
        wait_for(lambda: all(len(t.events("eval")) >= 2 for t in trainers), 330, "both trainers to finish")

        base_loss = max(t.events("eval")[0]["loss"] for t in trainers)  # the base model's held-out loss
        for t in trainers:
            after = t.events("eval")[-1]["loss"]
            assert after < 0.9 * base_loss, f"{t.name}: held-out loss {base_loss:.3f} -> {after:.3f}"
        for server, trainer in ((peers[0], peers[2]), (peers[1], peers[3])):
            # every replica joins every epoch's all-reduce, so the replicas agree after each epoch
            assert_replicas_agree_every_epoch(server, trainer, min_shared=5)
    finally:
        codes = [p.stop() for p in peers]
    assert codes == [0] * len(peers), f"peers did not stop cleanly on SIGTERM: {codes}"
    assert not [p.leftovers for p in peers if p.leftovers], "processes (p2pd, hivemind) outlived their peer"
