"""A round whose peers host their spans with ``--quantize nf4`` (two peers) and int8 (one) publishes a plain-PEFT
adapter that helps the fp32 base (one round for both modes: volunteers choose their own)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.integration.harness import Peer, coordinated_round, make_spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _eval_loss(model: torch.nn.Module, seqs: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=seqs, labels=seqs).loss)


@pytest.mark.timeout(600)
def test_quantized_round_publishes_adapter_for_the_full_precision_base(
    tmp_path: Path, demo_base: Path, demo_data: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm.adapter import verify_adapter
    from swarm.data import load_texts, pack
    from swarm.keys import load_public_key
    from swarm.quantize import block_nbytes_quantized, check_quantize

    spec = make_spec(demo_base, demo_data, "quantized", [0, 2, 4], epochs=3)
    server, pub_path, joins = coordinated_round(tmp_path, spec)
    peers: list[Peer] = []
    try:
        common = [*joins, "--metrics-port", "0"]
        train = str(demo_data / "train.jsonl")
        modes = {"server0": "nf4", "trainer0": "nf4", "trainer1": "int8"}
        for name, mode in modes.items():
            args = [*common, "--quantize", mode]
            if name == "server0":  # the first to join would get span 0-2: it asks for 2-4 (Join honours it)
                args += ["--span-index", "1"]
            if name.startswith("trainer"):  # both trainers train every step (the round waits for the second)
                args += [
                    "--data",
                    train,
                    "--eval-data",
                    str(demo_data / "eval.jsonl"),
                    "--shard-index",
                    name[-1],
                    "--num-shards",
                    "2",
                    "--min-trainers",
                    "2",
                ]
            peers.append(Peer(tmp_path, name, tmp_path / "unused.json", args, use_spec=False))
        assert peers[0].ready()["span"] == [2, 4]
        assert "span 2-4 (the span this peer asked for)" in (peers[0].dir / "log.txt").read_text()
        for peer in peers:
            port = peer.ready()["metrics_port"]
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            expected = block_nbytes_quantized(demo_base, 0, check_quantize(modes[peer.name]), 4)
            assert f'swarm_peer_block_bytes{{quantize="{modes[peer.name]}"}} {float(expected)}' in metrics
            health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())
            assert health["self_check"]["ok"], health["self_check"]
            assert any(c["name"] == "quantize" and c["status"] == "ok" for c in health["self_check"]["checks"])
            assert health["roster"]["enforced"] and health["roster"]["listed"], health["roster"]

            def reachability(port: int = port) -> dict[str, str] | None:
                health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())
                return next((c for c in health["self_check"]["checks"] if c["name"] == "reachability"), None)

            # at every start the coordinator dials the peer back (peer.reachability): 127.0.0.1 is direct
            found = wait_for(reachability, 60, f"{peer.name}'s reachability check in /health")
            assert found["status"] == "ok" and found["detail"].startswith("direct: the coordinator dialed"), found
        adapter = tmp_path / "coord" / "adapters" / "v1"
        wait_for(adapter.is_dir, 540, "the published adapter")

        manifest = verify_adapter(adapter, load_public_key(pub_path))
        assert manifest.eval_loss_after < manifest.eval_loss_before
        assert manifest.base_quantization == ("int8", "nf4")  # what the coordinator recorded at each Join
        tok = AutoTokenizer.from_pretrained(demo_base)
        held_out = pack(load_texts(demo_data / "eval.jsonl"), tok, 64)[:32]
        base_loss = _eval_loss(AutoModelForCausalLM.from_pretrained(demo_base), held_out)
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_base), str(adapter))
        tuned_loss = _eval_loss(tuned, held_out)
        print(f"held-out loss of the fp32 base {base_loss:.4f} -> with the nf4/int8-trained adapter {tuned_loss:.4f}")
        assert tuned_loss < 0.95 * base_loss
    finally:
        codes = [p.stop() for p in peers]
        server.stop()
    assert codes == [0] * len(peers), codes
    assert not [p.leftovers for p in peers if p.leftovers], "processes (p2pd, hivemind) outlived their peer"
