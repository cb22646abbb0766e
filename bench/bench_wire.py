"""Wire compression of activations and their gradients: bytes per token per span hop, and what it costs in loss.

Runs the same round (same seed, same data, same steps) through an in-process two-span swarm once per wire
compression (``none``, ``float16``, ``bfloat16``, ``uint8``) and reports, for each: bytes per token per hop
(forward activations and backward gradients, as serialized by ``hivemind.compression``), the held-out loss after
the round and its ratio to ``none``. Example::

    python bench/bench_wire.py --steps 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from peer.inprocess import InProcessSwarm
from peer.trainer import ChainTrainer, Router
from swarm.basemodel import make_base
from swarm.config import BaseModelRef, DataSettings, OptimizerSettings, RoundSpec, SpanRange, WireSettings
from swarm.corpus import generate, write_jsonl
from swarm.span import load_trainer_head
from swarm.steps import slots_per_step


def run_round(spec: RoundSpec, train: torch.Tensor, held_out: torch.Tensor, steps: int) -> tuple[float, int, int]:
    """Train ``steps`` swarm-wide steps; returns (held-out loss, wire bytes, tokens sent over the hop)."""
    wire = {"bytes": 0}

    def count(sent: int, received: int) -> None:
        wire["bytes"] += sent + received

    swarm = InProcessSwarm(spec)
    try:
        swarm.start()
        router = Router(swarm.dhts[0], spec, {spec.spans[0]: swarm.servers[0]}, timeout=60, on_wire=count)
        trainer = ChainTrainer(spec, load_trainer_head(spec.base.path), router)
        mbs = spec.data.micro_batch_size
        stream = iter(enumerate(train[i : i + mbs] for i in range(0, len(train) - mbs + 1, mbs)))
        for s in range(steps):
            swarm.step(trainer, s, stream, depth=1)
        slots = slots_per_step(spec.optimizer.target_batch_size, mbs)
        tokens, hop_bytes = steps * slots * mbs * spec.data.seq_len, wire["bytes"]
        return trainer.evaluate(steps, held_out, mbs), hop_bytes, tokens
    finally:
        swarm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="swarm-wide steps per round")
    parser.add_argument("--target-batch", type=int, default=16, help="samples per step")
    parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from swarm.data import load_round_data

    work = Path(tempfile.mkdtemp())
    base = make_base(work / "base", progress=False)
    write_jsonl(generate("finetune", 400, seed=1), work / "train.jsonl")
    write_jsonl(generate("finetune", 60, seed=2), work / "eval.jsonl")
    data = DataSettings(
        train_path=str(work / "train.jsonl"),
        eval_path=str(work / "eval.jsonl"),
        seq_len=args.seq,
        micro_batch_size=args.batch,
    )
    train, held_out = load_round_data(data, AutoTokenizer.from_pretrained(base))
    held_out = held_out[: 4 * args.batch]
    from swarm.checkpoint import read_config

    layers = int(read_config(base).num_hidden_layers)
    results = {}
    for i, compression in enumerate(("none", "float16", "bfloat16", "uint8")):
        spec = RoundSpec(
            round_id=f"wire{i}",
            base=BaseModelRef(path=str(base), num_layers=layers),
            spans=(SpanRange(start=0, end=layers // 2), SpanRange(start=layers // 2, end=layers)),
            data=data,
            optimizer=OptimizerSettings(target_batch_size=args.target_batch, matchmaking_time=1.0),
            wire=WireSettings(compression=compression),
        )
        results[compression] = run_round(spec, train, held_out, args.steps)
    ref = results["none"][0]
    print(f"{args.steps} steps of {args.target_batch} samples, micro-batch {args.batch}x{args.seq}, 2 spans, 1 hop")
    print("compression | bytes/token/hop (fwd+bwd) | held-out loss | vs none")
    for name, (loss, nbytes, tokens) in results.items():
        per_token = nbytes / max(tokens, 1)
        print(f"{name:11s} | {per_token:25.1f} | {loss:13.4f} | {(loss - ref) / ref * 100:+.2f}%")


if __name__ == "__main__":
    main()
