"""GPU: bf16 spans with LoRA vs plain PEFT LoRA on the same GPU, memory per block, blocks that fit in free memory.

Not yet run: no session so far was lent a GPU. ``--device cpu`` runs the same code on the CPU as a smoke test.
Base: a real config from ``bench/real_configs.py`` with random bf16 weights (built once, as in bench_shapes).

1. plain PEFT: the whole model (``from_pretrained``) + ``get_peft_model``, forward + backward + AdamW on random
   tokens: tokens/s and peak memory;
2. the same model as the swarm runs it in one process: trainer head (embeddings, norm, LM head) + one span of all
   blocks with LoRA (``load_span`` + ``attach_lora``), same step: tokens/s as a ratio to 1 (the span machinery's
   overhead), peak memory;
3. a half span alone (what a span server computes: forward + backward of hidden states): tokens/s, peak memory;
4. memory per block: allocated bytes of ``load_span`` of k blocks / k, vs ``swarm.checkpoint.block_nbytes``
   (the figure ``peer/daemon.py`` divides free memory by), and the blocks that fit (80% of free memory, the
   daemon's rule) for this model and, from their configs, for Llama-3-8B and Qwen2.5-7B.

nf4 spans: pending quantized span loading in ``swarm.span``; add a row here when it lands.

    python -m bench.bench_gpu [--model Qwen2.5-0.5B] [--batch 4] [--seq 512] [--steps 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from bench.bench_shapes import DEFAULT_CACHE, build_base
from bench.real_configs import CONFIGS, LLAMA3_8B, QWEN25_7B, block_param_count
from swarm.checkpoint import block_nbytes
from swarm.config import LoraSettings, SpanRange
from swarm.lora import attach_lora, init_lora_, lora_parameters, peft_lora_config
from swarm.span import load_span, load_trainer_head

GiB = 1 << 30


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: str) -> int:
    """Free cached blocks, reset the peak counter; returns bytes allocated now (0 on CPU)."""
    gc.collect()  # the previous configuration's model and optimizer
    if device != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def peak_memory(device: str) -> int:
    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else 0


def timed(step: Callable[[], None], warmup: int, steps: int, device: str) -> float:
    """Seconds per step after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - started) / steps


def plain_peft(base: Path, lora: LoraSettings, ids: torch.Tensor, args: argparse.Namespace) -> tuple[float, int]:
    reset_memory(args.device)
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(full.to(args.device), peft_lora_config(lora))
    init_lora_(lora_parameters(model), lora.init_seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, args.warmup, args.steps, args.device)
    peak = peak_memory(args.device)
    return ids.numel() / seconds, peak


def swarm_chain(
    base: Path, lora: LoraSettings, ids: torch.Tensor, layers: int, args: argparse.Namespace
) -> tuple[float, int]:
    reset_memory(args.device)
    head = load_trainer_head(base, torch.bfloat16, args.device)
    span = attach_lora(load_span(base, SpanRange(start=0, end=layers), torch.bfloat16, args.device), lora)
    span.train()
    opt = torch.optim.AdamW(list(lora_parameters(span).values()), lr=1e-4)

    def step() -> None:
        head.loss(span(head.embed(ids)), ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(step, args.warmup, args.steps, args.device)
    peak = peak_memory(args.device)
    return ids.numel() / seconds, peak


def half_span(base: Path, lora: LoraSettings, layers: int, hidden: int, args: argparse.Namespace) -> tuple[float, int]:
    reset_memory(args.device)
    span = attach_lora(load_span(base, SpanRange(start=0, end=layers // 2), torch.bfloat16, args.device), lora)
    span.train()
    x = (torch.randn(args.batch, args.seq, hidden, device=args.device) * 0.1).to(torch.bfloat16)

    def step() -> None:
        inputs = x.detach().requires_grad_(True)
        span(inputs).float().pow(2).mean().backward()
        span.zero_grad(set_to_none=True)

    seconds = timed(step, args.warmup, args.steps, args.device)
    peak = peak_memory(args.device)
    return args.batch * args.seq / seconds, peak


def memory_per_block(base: Path, blocks: int, device: str) -> int:
    before = reset_memory(device)
    span = load_span(base, SpanRange(start=0, end=blocks), torch.bfloat16, device)
    used = (int(torch.cuda.memory_allocated()) - before) if device == "cuda" else 0
    del span
    return used // blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen2.5-0.5B", help=f"one of {', '.join(CONFIGS)}")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the random-weight bases are kept")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu for a smoke test")
    cfg = CONFIGS[args.model]
    base = build_base(cfg, args.cache)
    lora = LoraSettings()
    layers = cfg.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{cfg.name} (random bf16 weights) on {name}; micro-batch {args.batch}x{args.seq}; LoRA r{lora.rank} q/k/v/o")
    peft_tps, peft_peak = plain_peft(base, lora, ids, args)
    chain_tps, chain_peak = swarm_chain(base, lora, ids, layers, args)
    half_tps, half_peak = half_span(base, lora, layers, cfg.hidden_size, args)
    print(f"plain PEFT, whole model, bf16        : {peft_tps:10.0f} tokens/s  1.00x  peak {peft_peak / GiB:.2f} GiB")
    print(
        f"trainer head + span [0,{layers}) + LoRA    : {chain_tps:10.0f} tokens/s  {chain_tps / peft_tps:.2f}x  "
        f"peak {chain_peak / GiB:.2f} GiB"
    )
    print(
        f"span [0,{layers // 2}) alone (server's compute): {half_tps:10.0f} tokens/s  {half_tps / peft_tps:.2f}x  "
        f"peak {half_peak / GiB:.2f} GiB"
    )
    predicted = block_nbytes(base, 0, 2)
    if args.device == "cuda":
        measured = memory_per_block(base, max(1, layers // 2), args.device)
        free, total = torch.cuda.mem_get_info()
        print(
            f"memory per block: {measured / 2**20:.1f} MiB allocated, block_nbytes predicts {predicted / 2**20:.1f} MiB "
            f"({measured / predicted:.3f}x); free {free / GiB:.1f} of {total / GiB:.1f} GiB"
        )
        for other, per_block in (
            (cfg.name, predicted),
            (LLAMA3_8B.name, block_param_count(LLAMA3_8B) * 2),
            (QWEN25_7B.name, block_param_count(QWEN25_7B) * 2),
        ):
            n_layers = CONFIGS[other].num_hidden_layers
            fits = int(free * 0.8 // per_block)
            print(
                f"  --num-blocks from free memory (80%, peer/daemon.py): {other}: {fits} blocks (model has {n_layers})"
            )
    else:
        print(
            f"memory per block: block_nbytes predicts {predicted / 2**20:.1f} MiB bf16 (GPU figures need --device cuda)"
        )


if __name__ == "__main__":
    main()
