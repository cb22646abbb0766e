"""The swarm trains what centralized LoRA trains: N swarm-wide steps of B samples equal N PEFT steps.

Real peer processes on 127.0.0.1 (fp32, wire compression none, deterministic sample order). Each trainer logs
which micro-batches of its data stream it completed in each step; centralized PEFT LoRA trained on the same
micro-batches, grouped into the same steps, from the same initial weights must give the same LoRA tensors
(max abs diff <= 1e-4) and the same held-out loss (4 decimals).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarm.config import RoundSpec
from tests.integration.harness import Peer, make_spec, save_spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EPOCHS, TBS = 3, 16


def _trainer_data(spec: RoundSpec, train: Path, shard: int, shards: int, upto: int) -> tuple[list, torch.Tensor]:
    from transformers import AutoTokenizer

    from peer.training_loop import data_stream
    from swarm.checkpoint import resolve_checkpoint
    from swarm.data import load_round_data

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(spec.base.path))
    settings = spec.data.model_copy(update={"train_path": str(train)})
    rows, held_out = load_round_data(settings, tokenizer, shard, shards)
    stream = data_stream(rows, spec.data.micro_batch_size, seed=0)
    return [next(stream) for _ in range(upto + 1)], held_out


def _check_against_centralized(spec: RoundSpec, train: Path, trainers: list[Peer], servers: dict[str, Peer]) -> None:
    from swarm.reference import centralized_lora

    per_step: list[list[torch.Tensor]] = [[] for _ in range(EPOCHS)]
    held_out = None
    for shard, t in enumerate(trainers):
        steps = {e["step"]: e for e in t.events("step")}
        assert sorted(steps) == list(range(EPOCHS)), f"{t.name} closed steps {sorted(steps)}"
        upto = max(mb["batch_no"] for e in steps.values() for mb in e["microbatches"])
        data, held_out = _trainer_data(spec, train, shard, len(trainers), upto)
        for s, e in steps.items():
            per_step[s] += [data[mb["batch_no"]] for mb in e["microbatches"]]
    for s, mbs in enumerate(per_step):
        assert sum(len(m) for m in mbs) == TBS, f"step {s} holds {sum(len(m) for m in mbs)} samples, not {TBS}"
    assert held_out is not None
    eval_set = held_out[: 4 * spec.data.micro_batch_size]
    reference, ref_loss = centralized_lora(spec, per_step, eval_set)
    swarm_state: dict[str, torch.Tensor] = {}
    for name, peer in servers.items():
        snap = peer.snapshot(EPOCHS)
        assert snap is not None, f"{peer.name} wrote no snapshot of span {name} at epoch {EPOCHS}"
        swarm_state.update(snap)
    assert swarm_state.keys() == reference.keys()
    worst = max((swarm_state[k] - reference[k]).abs().max().item() for k in reference)
    assert worst <= 1e-4, f"swarm LoRA differs from centralized PEFT by {worst:.3g}"
    moved = max((reference[k] - 0).abs().max().item() for k in reference if "lora_B" in k)
    assert moved > 1e-3, "training did not move lora_B at all (the comparison would be vacuous)"
    after = trainers[0].events("eval")[-1]
    assert after["epoch"] == EPOCHS
    assert round(after["loss"], 4) == round(ref_loss, 4), f"held-out {after['loss']:.6f} vs centralized {ref_loss:.6f}"


@pytest.mark.timeout(300)
def test_one_trainer_two_spans_equals_centralized(tmp_path: Path, demo_base: Path, demo_data: Path) -> None:
    spec = make_spec(demo_base, demo_data, "exact1", [0, 2, 4], epochs=EPOCHS, tbs=TBS)
    spec_path = save_spec(tmp_path, spec)
    train = demo_data / "train.jsonl"
    peers: list[Peer] = []
    try:
        peers.append(Peer(tmp_path, "s1", spec_path, ["--span-index", "1"]))
        bootstrap = ["--initial-peers", peers[0].ready()["maddrs"][0]]
        peers.append(Peer(tmp_path, "t0", spec_path, ["--span-index", "0", "--data", str(train), *bootstrap]))
        wait_for(lambda: len(peers[1].events("eval")) >= 2, 240, "the trainer to finish")
        wait_for(lambda: peers[0].snapshot(EPOCHS) is not None, 30, "span 2-4 to apply the last step")
        _check_against_centralized(spec, train, [peers[1]], {"0-2": peers[1], "2-4": peers[0]})
    finally:
        codes = [p.stop() for p in peers]
    assert codes == [0] * len(peers), f"peers did not stop cleanly: {codes}"


@pytest.mark.timeout(420)
def test_two_trainers_two_by_two_equals_centralized(tmp_path: Path, demo_base: Path, demo_data: Path) -> None:
    spec = make_spec(demo_base, demo_data, "exact2", [0, 2, 4], epochs=EPOCHS, tbs=TBS)
    spec_path = save_spec(tmp_path, spec)
    train = demo_data / "train.jsonl"
    peers: list[Peer] = []
    try:
        peers.append(Peer(tmp_path, "s0", spec_path, ["--span-index", "0"]))
        bootstrap = ["--initial-peers", peers[0].ready()["maddrs"][0]]
        peers.append(Peer(tmp_path, "s1", spec_path, ["--span-index", "1", *bootstrap]))
        peers[1].ready()
        for i in (0, 1):
            args = ["--span-index", str(i), "--data", str(train), "--shard-index", str(i), "--num-shards", "2"]
            args += ["--min-replicas", "2", "--min-trainers", "2"]
            peers.append(Peer(tmp_path, f"t{i}", spec_path, [*args, *bootstrap]))
        trainers = peers[2:]
        wait_for(lambda: all(len(t.events("eval")) >= 2 for t in trainers), 330, "both trainers to finish")
        for p in peers:
            wait_for(lambda p=p: p.snapshot(EPOCHS) is not None, 30, f"{p.name} to apply the last step")
        _check_against_centralized(spec, train, trainers, {"0-2": peers[0], "2-4": peers[1]})
        for a, b in ((peers[0], peers[2]), (peers[1], peers[3])):
            # every replica joins every epoch's all-reduce, so the replicas agree after each epoch
            for e in range(1, EPOCHS + 1):
                sa, sb = a.snapshot(e), b.snapshot(e)
                assert sa is not None and sb is not None
                gap = max((sa[k] - sb[k]).abs().max().item() for k in sa)
                assert gap <= 1e-6, f"replicas {a.name}/{b.name} differ by {gap} after epoch {e}"
        for t in trainers:
            before, after = t.events("eval")[0]["loss"], t.events("eval")[-1]["loss"]
            assert after < before, f"{t.name}: held-out loss {before:.4f} -> {after:.4f}"
    finally:
        codes = [p.stop() for p in peers]
    assert codes == [0] * len(peers), f"peers did not stop cleanly: {codes}"
    assert not [p.leftovers for p in peers if p.leftovers], "processes (p2pd, hivemind) outlived their peer"
