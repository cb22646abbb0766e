"""Real model shapes on CPU: memory and load time of half the blocks vs all of them, and a span's training speed.

Bases with the published configs of Qwen2.5-0.5B and TinyLlama-1.1B (``bench/real_configs.py``) and random bf16
weights are built locally (``save_pretrained``, safetensors; no download) and cached under ``--cache``. Every
measurement runs in a fresh subprocess so its resident memory is its own:

* ``span``: ``swarm.span.load_span`` of blocks [0, L/2) or [0, L) (reads only those blocks' tensors), at fp32 or
  bf16, then every tensor touched once (safetensors maps the file; bf16 tensors are read on first use): load time
  (to touched), RSS growth over the process after imports, peak RSS (VmHWM);
* ``hf``: ``AutoModelForCausalLM.from_pretrained`` of the whole model, the baseline a span is compared with;
* ``train``: one span [0, L/2) in fp32 with LoRA (``swarm.lora.attach_lora``, rank 8, q/k/v/o), forward + backward
  of a micro-batch of hidden states, with torch threads = 1 and 2: tokens/s.

    python -m bench.bench_shapes [--models Qwen2.5-0.5B,TinyLlama-1.1B] [--batch 1] [--seq 128] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.real_configs import CONFIGS, QKVO, RealConfig, block_param_count, hf_config

DEFAULT_CACHE = Path("/tmp/loraswarm-bench-bases")
GB = 1e9


def build_base(cfg: RealConfig, cache: Path) -> Path:
    """Random-weight bf16 checkpoint of ``cfg`` under ``cache/<name>`` (built once; a temp dir is renamed in)."""
    out = cache / cfg.name
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{cfg.name}-{os.getpid()}"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    return out


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """VmHWM: this process's peak RSS since exec (ru_maxrss would carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement (``job['kind']`` in span / hf / train) in this fresh process."""
    import torch
    from transformers import AutoModelForCausalLM

    from swarm.config import LoraSettings, SpanRange
    from swarm.lora import attach_lora
    from swarm.span import load_span

    torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[job["dtype"]]
    before = rss()
    started = time.perf_counter()
    model: Any
    if job["kind"] == "hf":
        model = AutoModelForCausalLM.from_pretrained(job["base"], dtype=dtype)
    else:
        model = load_span(job["base"], SpanRange(start=0, end=job["end"]), dtype=dtype)
    load_s = time.perf_counter() - started
    rss_loaded = rss()
    # safetensors maps the file: tensors kept in the stored dtype are read on first use. Touch every tensor, as
    # the first forward would, so the figures are what a serving peer holds.
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.sum()
    result: dict[str, Any] = {
        "load_s": time.perf_counter() - started,
        "construct_s": load_s,
        "rss_before": before,
        "rss_loaded": rss_loaded,
        "rss_after": rss(),
        "peak": peak_rss(),
    }
    if job["kind"] != "train":
        return result
    attach_lora(model, LoraSettings(target_modules=QKVO))
    model.train()
    hidden = int(model.hidden_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(job["batch"], job["seq"], hidden, generator=gen) * 0.1
    tokens = job["batch"] * job["seq"]
    for threads in job["threads"]:
        torch.set_num_threads(threads)
        times, cpu = [], 0.0
        for step in range(job["warmup"] + job["steps"]):
            started, cpu_started = time.perf_counter(), time.process_time()
            out = model(x.requires_grad_(True))
            out.float().pow(2).mean().backward()  # grads reach LoRA and the input (what a span server returns)
            if step >= job["warmup"]:
                times.append(time.perf_counter() - started)
                cpu += time.process_time() - cpu_started
            model.zero_grad(set_to_none=True)
            x.grad = None
        result[f"tok_s_{threads}"] = tokens * len(times) / sum(times)
        result[f"cores_{threads}"] = cpu / sum(times)  # CPU time per wall second: the cores this process got
    result["peak_train"] = peak_rss()
    return result


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_shapes", "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job['kind']} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def measure_model(cfg: RealConfig, base: Path, args: argparse.Namespace) -> None:
    layers, half = cfg.num_hidden_layers, cfg.num_hidden_layers // 2
    if not args.only_train:
        measure_memory(cfg, base, layers, half)
    measure_training(base, half, args)


def measure_memory(cfg: RealConfig, base: Path, layers: int, half: int) -> None:
    block = block_param_count(cfg)
    print(
        f"\n== {cfg.name}: {layers} blocks x hidden {cfg.hidden_size}, {block:,} parameters per block, "
        f"checkpoint {sum(f.stat().st_size for f in base.glob('*.safetensors')) / GB:.2f} GB bf16 =="
    )
    print(f"{'what':<34} {'load s':>7} {'RSS growth GB':>14} {'tensor GB':>10} {'peak RSS GB':>12}")
    rows: dict[str, dict[str, Any]] = {}
    for dtype, nbytes in (("fp32", 4), ("bf16", 2)):
        for end, label in ((half, "half"), (layers, "all")):
            job = {"kind": "span", "base": str(base), "end": end, "dtype": dtype}
            r = rows[f"{label}-{dtype}"] = run_job(job)
            print(
                f"{f'load_span [0,{end}) {label} blocks {dtype}':<34} {r['load_s']:>7.2f} "
                f"{(r['rss_after'] - r['rss_before']) / GB:>14.2f} {block * end * nbytes / GB:>10.2f} "
                f"{r['peak'] / GB:>12.2f}"
            )
        r = rows[f"hf-{dtype}"] = run_job({"kind": "hf", "base": str(base), "end": layers, "dtype": dtype})
        print(
            f"{f'from_pretrained whole model {dtype}':<34} {r['load_s']:>7.2f} "
            f"{(r['rss_after'] - r['rss_before']) / GB:>14.2f} {'':>10} {r['peak'] / GB:>12.2f}"
        )
    for dtype in ("fp32", "bf16"):
        h, a, f = rows[f"half-{dtype}"], rows[f"all-{dtype}"], rows[f"hf-{dtype}"]
        grow = {k: v["rss_after"] - v["rss_before"] for k, v in (("h", h), ("a", a), ("f", f))}
        print(
            f"{dtype}: half/all blocks: RSS growth {grow['h'] / grow['a']:.2f}x, load time "
            f"{h['load_s'] / a['load_s']:.2f}x; half blocks vs whole-model from_pretrained: RSS growth "
            f"{grow['h'] / grow['f']:.2f}x, peak {h['peak'] / f['peak']:.2f}x, load time {h['load_s'] / f['load_s']:.2f}x"
        )


def measure_training(base: Path, half: int, args: argparse.Namespace) -> None:
    job = {
        "kind": "train",
        "base": str(base),
        "end": half,
        "dtype": "fp32",
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": 1,
        "threads": [1, 2],
    }
    r = run_job(job)
    print(
        f"train span [0,{half}) fp32 + LoRA r8 q/k/v/o, micro-batch {args.batch}x{args.seq}, forward+backward: "
        + "; ".join(
            f"{t} thread{'s' if t > 1 else ''}: {r[f'tok_s_{t}']:.1f} tokens/s using {r[f'cores_{t}']:.2f} cores "
            f"({r[f'tok_s_{t}'] / r[f'cores_{t}']:.1f} tokens per CPU-second)"
            for t in (1, 2)
        )
        + f"; 2 vs 1 thread {r['tok_s_2'] / r['tok_s_1']:.2f}x; peak RSS {r['peak_train'] / GB:.2f} GB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="Qwen2.5-0.5B,TinyLlama-1.1B", help=f"any of {', '.join(CONFIGS)}")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the random-weight bases are kept")
    parser.add_argument("--batch", type=int, default=1, help="sequences per training micro-batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per thread count (after 1 warm-up)")
    parser.add_argument("--only-train", action="store_true", help="skip the memory / load-time measurements")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    for name in args.models.split(","):
        cfg = CONFIGS[name]
        started = time.perf_counter()
        base = build_base(cfg, args.cache)
        print(f"base {cfg.name} at {base} (ready in {time.perf_counter() - started:.0f} s)")
        measure_model(cfg, base, args)


if __name__ == "__main__":
    main()
