"""Resident memory per block with ``--quantize nf4`` / ``int8`` vs the compute dtype, measured in the same run.

For each compute dtype and quantization, a fresh child process loads a span (with LoRA attached) and reports:
the bytes of tensor storage per block (exact; the same figure as the ``swarm_peer_block_bytes`` gauge and the
self-check's prediction), the growth of the process' resident set size after a forward+backward touched every
weight (``malloc_trim`` first; includes LoRA and whatever the libraries cache), and the forward+backward time of
one micro-batch [1, 64 tokens] on the CPU (bitsandbytes' CPU kernels are not its GPU kernels: indicative only). Ratios are against the unquantized span in the same compute dtype.
The base is built locally with random weights (``make_base --pretrain-steps 0``), by default 8 blocks of hidden 1024.

    python bench/bench_quantize.py [--layers 8] [--hidden 1024] [--dtypes float32,bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(base: str, mode: str, dtype_name: str, layers: int, threads: int) -> dict[str, float]:
    import bitsandbytes  # noqa: F401 (imported in every mode so that its own footprint is not counted)
    import psutil
    import torch

    from swarm.config import LoraSettings, SpanRange
    from swarm.lora import attach_lora
    from swarm.quantize import block_nbytes_quantized, check_quantize, span_block_nbytes
    from swarm.span import load_span

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    proc = psutil.Process()
    libc = ctypes.CDLL("libc.so.6")

    def settled_rss() -> int:
        gc.collect()
        libc.malloc_trim(0)  # hand freed heap pages back, so RSS is what is held, not allocator slack
        return int(proc.memory_info().rss)

    rss_before = settled_rss()
    span = attach_lora(
        load_span(base, SpanRange(start=0, end=layers), dtype=dtype, quantize=check_quantize(mode)), LoraSettings()
    )
    x = torch.randn(1, 64, int(span.config.hidden_size), dtype=dtype)  # type: ignore[union-attr, arg-type]
    timings = []
    for _ in range(3):  # also touches every weight (safetensors tensors are memory-mapped until first read)
        started = time.perf_counter()
        span(x.clone().requires_grad_(True)).float().pow(2).mean().backward()
        timings.append(time.perf_counter() - started)
    span.zero_grad(set_to_none=True)
    rss_after = settled_rss()
    return {
        "block_bytes": span_block_nbytes(span),
        "predicted_block_bytes": block_nbytes_quantized(base, 0, check_quantize(mode), dtype.itemsize),
        "rss_per_block": (rss_after - rss_before) / layers,
        "step_seconds": min(timings[1:]),
    }


def run_child(base: Path, mode: str, dtype: str, layers: int, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, "--base", str(base), "--dtypes", dtype]
    cmd += ["--layers", str(layers), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="Compute dtypes to compare, comma-separated.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base", default="", help="Use this checkpoint instead of building one.")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.base, args.child, args.dtypes, args.layers, args.threads)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        base = Path(args.base) if args.base else None
        if base is None:
            from swarm.basemodel import make_base

            base = make_base(
                Path(tmp) / "base", layers=args.layers, hidden=args.hidden, heads=8, kv_heads=2,
                pretrain_steps=0, progress=False, use_cache=False,
            )  # fmt: skip
        print(f"base: {args.layers} blocks, hidden {args.hidden}, intermediate {4 * args.hidden}; LoRA r=8 on q,k,v,o")
        print(
            f"{'dtype':9} {'quantize':8} {'bytes/block':>12} {'ratio':>6} {'RSS/block':>12} {'ratio':>6} {'step s':>7}"
        )
        for dtype in args.dtypes.split(","):
            ref = None
            for mode in ("none", "nf4", "int8"):
                r = run_child(base, mode, dtype, args.layers, args.threads)
                assert r["block_bytes"] == r["predicted_block_bytes"], f"prediction off for {dtype}/{mode}: {r}"
                ref = ref or r
                print(
                    f"{dtype:9} {mode:8} {r['block_bytes'] / 2**20:9.2f}MiB {r['block_bytes'] / ref['block_bytes']:6.3f}"
                    f" {r['rss_per_block'] / 2**20:9.2f}MiB {r['rss_per_block'] / ref['rss_per_block']:6.3f}"
                    f" {r['step_seconds']:7.3f}"
                )


if __name__ == "__main__":
    main()
