"""A full round on 127.0.0.1: coordinator + 3 peers publish a signed adapter; a second round continues from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.config import CoordinatorConfig
from coordinator.server import serve
from tests.integration.harness import Peer, make_spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _eval_loss(model: torch.nn.Module, seqs: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=seqs, labels=seqs).loss)


@pytest.mark.timeout(600)
def test_round_publishes_adapter_and_next_round_continues(tmp_path: Path, demo_base: Path, demo_data: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm.adapter import verify_adapter
    from swarm.data import load_texts, pack
    from swarm.keys import load_public_key

    spec = make_spec(demo_base, demo_data, "e2e", [0, 2, 4], epochs=3)
    server = serve(
        CoordinatorConfig(
            port=0,
            metrics_port=None,
            workdir=tmp_path / "coord",
            round_spec=spec,
            rounds=2,
            heartbeat_interval_s=1.0,
            heartbeat_timeout_s=30.0,
            finalize_timeout_s=120.0,
        )
    )
    pub_path = tmp_path / "coord" / "coordinator" / "public_key.pem"
    peers: list[Peer] = []
    try:
        common = ["--coordinator", server.address, "--coordinator-public-key", str(pub_path)]
        train = str(demo_data / "train.jsonl")
        peers.append(Peer(tmp_path, "server0", tmp_path / "unused.json", common, use_spec=False))
        peers[0].ready()
        for i in (0, 1):
            args = [
                *common,
                "--data",
                train,
                "--eval-data",
                str(demo_data / "eval.jsonl"),
                "--shard-index",
                str(i),
                "--num-shards",
                "2",
            ]
            peers.append(Peer(tmp_path, f"trainer{i}", tmp_path / "unused.json", args, use_spec=False))
        adapters = tmp_path / "coord" / "adapters"
        wait_for(lambda: (adapters / "v2").is_dir(), 540, "two published adapters (two rounds)")

        public = load_public_key(pub_path)
        first, second = verify_adapter(adapters / "v1", public), verify_adapter(adapters / "v2", public)
        assert first.parent_version is None and second.parent_version == "v1"
        assert first.eval_loss_after < first.eval_loss_before
        assert {c.peer_id for c in first.contributors} and all(c.samples >= 0 for c in first.contributors)

        tok = AutoTokenizer.from_pretrained(demo_base)
        held_out = pack(load_texts(demo_data / "eval.jsonl"), tok, 64)[:32]
        base_loss = _eval_loss(AutoModelForCausalLM.from_pretrained(demo_base), held_out)
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_base), str(adapters / "v2"))
        assert _eval_loss(tuned, held_out) < 0.9 * base_loss
    finally:
        codes = [p.stop() for p in peers]
        server.stop()
    assert codes == [0] * len(peers), codes
    assert not [p.leftovers for p in peers if p.leftovers], "processes (p2pd, hivemind) outlived their peer"
