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

import hivemind
import torch
from hivemind.utils.crypto import RSAPrivateKey

from peer.announce import record_validators
from peer.inprocess import in_process_server
from peer.step_records import StepRecorder
from peer.trainer import ChainTrainer, Router
from swarm.basemodel import make_base
from swarm.config import BaseModelRef, DataSettings, OptimizerSettings, RoundSpec, SpanRange, WireSettings
from swarm.corpus import generate, write_jsonl
from swarm.span import load_trainer_head
from swarm.steps import slots_per_step

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def run_round(spec: RoundSpec, train: torch.Tensor, held_out: torch.Tensor, steps: int) -> tuple[float, int, int]:
    """Train ``steps`` swarm-wide steps; returns (held-out loss, wire bytes, tokens sent over the hop)."""
    dhts, servers, announcers, keys = [], [], [], []
    wire = {"bytes": 0}

    def count(sent: int, received: int) -> None:
        wire["bytes"] += sent + received

    try:
        for span in spec.spans:
            key = RSAPrivateKey()
            dht = hivemind.DHT(
                start=True,
                host_maddrs=LOCAL,
                initial_peers=dhts[0].get_visible_maddrs() if dhts else [],
                record_validators=record_validators(spec.round_id, key),
            )
            server, ann = in_process_server(spec, span, dht, key)
            server.start(catch_up=False)
            ann.start()
            dhts.append(dht)
            keys.append(key)
            servers.append(server)
            announcers.append(ann)
        router = Router(dhts[0], spec, {spec.spans[0]: servers[0]}, timeout=60, on_wire=count)
        trainer = ChainTrainer(spec, load_trainer_head(spec.base.path), router)
        recorder = StepRecorder(dhts[0], spec.round_id, private_key=keys[0])
        slots = slots_per_step(spec.optimizer.target_batch_size, spec.data.micro_batch_size)
        mbs = spec.data.micro_batch_size
        stream = iter(enumerate(train[i : i + mbs] for i in range(0, len(train) - mbs + 1, mbs)))
        for s in range(steps):
            recorder.open(s)
            done = trainer.run_step(s, slots, stream, depth=1)
            recorder.close(s, [mb.index for mb in done], sum(len(mb.input_ids) for mb in done))
        recorder.finish()
        tokens = steps * slots * mbs * spec.data.seq_len
        hop_bytes = wire["bytes"]
        loss = trainer.evaluate(steps, held_out, mbs)
        return loss, hop_bytes, tokens
    finally:
        for ann in announcers:
            ann.stop(leave=False)
        for server in servers:
            server.shutdown()
        for dht in dhts:
            dht.shutdown()


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
