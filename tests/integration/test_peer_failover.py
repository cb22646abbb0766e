"""Fault tolerance and the data-parallel case, with real peer processes on 127.0.0.1.

- A replica is SIGKILLed mid-training: the trainer fails over to the other replica and training goes on.
- A peer that joins late downloads its span's state from a replica before contributing.
- Two peers that each host the whole model (pure data parallelism): loss drops, replicas stay identical.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.integration.harness import Peer, assert_replicas_agree_every_epoch, make_spec, save_spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(420)
def test_killed_replica_fails_over_and_late_peer_catches_up(tmp_path: Path, demo_base: Path, demo_data: Path) -> None:
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "failover", [0, 2, 4], epochs=10))
    peers: list[Peer] = []
    try:
        peers.append(Peer(tmp_path, "s1a", spec_path, ["--span-index", "1"]))
        boot = ["--initial-peers", peers[0].ready()["maddrs"][0]]
        peers.append(Peer(tmp_path, "s1b", spec_path, ["--span-index", "1", *boot]))
        peers[1].ready()
        trainer = Peer(
            tmp_path,
            "t0",
            spec_path,
            ["--span-index", "0", "--data", str(demo_data / "train.jsonl"), "--request-timeout", "5", *boot],
        )
        peers.append(trainer)
        wait_for(lambda: max(trainer.epochs(), default=0) >= 2, 240, "two epochs before the fault")
        assert_replicas_agree_every_epoch(peers[0], peers[1])  # both replicas, before the fault
        victim = peers[0]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        killed_at = max(trainer.epochs())

        # bootstrap from a live peer: the victim's p2pd dies with it (peer/orphan_guard.py)
        live_boot = ["--initial-peers", peers[1].ready()["maddrs"][0]]
        late = Peer(tmp_path, "s1c", spec_path, ["--span-index", "1", *live_boot])
        peers.append(late)
        late.ready()
        wait_for(lambda: len(trainer.events("eval")) >= 2, 300, "the trainer to finish after the fault")
        assert max(trainer.epochs()) >= killed_at + 2, "training did not go on after the replica died"
        before, after = (e["loss"] for e in trainer.events("eval"))
        assert after < 0.9 * before

        log = (late.dir / "log.txt").read_text()
        assert "loaded state at epoch" in log, "the late peer did not download its span's state"
        first = min(late.epochs())
        assert first > 0, "the late peer started from epoch 0 instead of the swarm's epoch"
        # from its downloaded state on, the late replica agrees with the survivor after every epoch (training alone
        # is fast now, so the late peer may join near the end: its first, downloaded state is always compared)
        shared = assert_replicas_agree_every_epoch(late, peers[1], min_shared=1)
        assert shared[0] == first, f"the late peer's first state (epoch {first}) has no counterpart: {shared}"
    finally:
        codes = {p.name: p.stop() for p in peers}
    assert codes["s1a"] == -signal.SIGKILL
    assert all(code == 0 for name, code in codes.items() if name != "s1a"), codes


@pytest.mark.timeout(300)
def test_data_parallel_whole_model_peers(tmp_path: Path, demo_base: Path, demo_data: Path) -> None:
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "dp", [0, 4], epochs=4))
    train = str(demo_data / "train.jsonl")
    peers: list[Peer] = []
    try:
        both = ["--min-replicas", "2"]  # a fixed-size data-parallel job: start training together
        peers.append(
            Peer(tmp_path, "a", spec_path, ["--data", train, "--shard-index", "0", "--num-shards", "2", *both])
        )
        boot = ["--initial-peers", peers[0].ready()["maddrs"][0]]
        peers.append(
            Peer(tmp_path, "b", spec_path, ["--data", train, "--shard-index", "1", "--num-shards", "2", *both, *boot])
        )
        wait_for(lambda: all(len(p.events("eval")) >= 2 for p in peers), 240, "both data-parallel peers")
        base_loss = max(p.events("eval")[0]["loss"] for p in peers)  # the base model's held-out loss
        for p in peers:
            after = p.events("eval")[-1]["loss"]
            assert after < 0.9 * base_loss, f"{p.name}: {base_loss:.3f} -> {after:.3f}"
        assert_replicas_agree_every_epoch(peers[0], peers[1], min_shared=4)
        for p in peers:  # no activation traffic: each peer ran the whole model locally
            assert "failing over" not in (p.dir / "log.txt").read_text()
    finally:
        codes = [p.stop() for p in peers]
    assert codes == [0, 0]


@pytest.mark.timeout(240)
def test_trainer_waits_for_a_missing_span(tmp_path: Path, demo_base: Path, demo_data: Path) -> None:
    spec_path = save_spec(tmp_path, make_spec(demo_base, demo_data, "waiting", [0, 2, 4], epochs=2))
    peers: list[Peer] = []
    try:
        trainer = Peer(tmp_path, "t0", spec_path, ["--span-index", "0", "--data", str(demo_data / "train.jsonl")])
        peers.append(trainer)
        boot = ["--initial-peers", trainer.ready()["maddrs"][0]]
        wait_for(
            lambda: "waiting for a server of span 2-4" in (trainer.dir / "log.txt").read_text(),
            90,
            "the trainer to say it waits for span 2-4",
        )
        assert trainer.proc.poll() is None, "the trainer crashed instead of waiting"
        peers.append(Peer(tmp_path, "s1", spec_path, ["--span-index", "1", *boot]))
        wait_for(lambda: len(trainer.events("eval")) >= 2, 180, "training to proceed once span 2-4 is served")
    finally:
        codes = [p.stop() for p in peers]
    assert codes == [0, 0]
