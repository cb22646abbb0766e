"""Bytes on the wire: the LoRA gradient all-reduce vs a full-model fp32 all-reduce, and activations per span hop.

1. Tiny base (measured): LoRA bytes of a real span with LoRA attached (``swarm.span.load_span`` +
   ``swarm.lora.attach_lora``), the full model's parameter bytes, and the bytes one peer sends in a hivemind
   butterfly all-reduce of each, counted from the serialized parts hivemind's own ``TensorPartContainer`` makes.
2. Real shapes (computed from the published configs in ``bench/real_configs.py``): Llama-3-8B and Qwen2.5-7B,
   rank 8 and 16, q/k/v/o (the project's default) and all linear modules.
3. Activations: bytes per token per span hop for each hivemind ``CompressionType``, measured with
   ``serialize_torch_tensor`` on real hidden states of the tiny base (tiled to real hidden sizes).

Butterfly all-reduce (hivemind ``AllReduceRunner``): each of n peers reduces 1/n of the vector. A peer sends the
other n-1 slices to their reducers and returns its averaged slice to the n-1 others, so it sends
2 * (n - 1) / n * V bytes per all-reduce of a V-byte vector (and receives as much).

    python -m bench.bench_comm [--peers 2,4,8] [--micro-batch 8] [--seq 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    NoCompression,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.compression.floating import Float16Compression
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import CompressionType

from bench.real_configs import ALL_LINEAR, LLAMA3_8B, QKVO, QWEN25_7B, RealConfig, lora_param_count, param_count
from swarm.basemodel import make_base
from swarm.checkpoint import read_config
from swarm.config import LoraSettings, SpanRange
from swarm.corpus import generate
from swarm.data import pack
from swarm.lora import attach_lora, lora_parameters
from swarm.span import load_span

MB = 1e6


def butterfly_bytes_per_peer(vector_bytes: float, n: int) -> float:
    """Bytes one peer sends in a butterfly all-reduce of ``vector_bytes`` among ``n`` peers: 2 (n-1)/n V."""
    return 2 * (n - 1) / n * vector_bytes


def measured_allreduce_bytes(tensors: list[torch.Tensor], n: int, compression: CompressionBase) -> tuple[float, int]:
    """Serialized bytes a peer sends in one all-reduce of ``tensors`` among ``n`` equal peers: (mean, max) over peers.

    Peer i sends the slices of the n-1 other reducers (reduce-scatter) and its own averaged slice back to each of
    the n-1 others (all-gather; hivemind returns deltas, the same size as the slice). Slices are cut by hivemind's
    ``TensorPartContainer`` (parts of up to 512 KiB, whole parts per peer) and serialized as hivemind does.
    """
    container = TensorPartContainer(tensors, peer_fractions=[1.0] * n, compression=compression)
    slices = []
    for peer in range(n):
        parts = container.get_raw_input_parts(peer)
        slices.append(sum(compression.compress(p, CompressionInfo.from_tensor(p)).ByteSize() for p in parts))
    total = sum(slices)
    sent = [total - s + (n - 1) * s for s in slices]
    return sum(sent) / n, max(sent)


def tiny_base_section(base: Path, peers: list[int]) -> torch.Tensor:
    """Print the measured figures of the tiny base; return a real activation tensor (span 0's output)."""
    from transformers import AutoModelForCausalLM

    config = read_config(base)
    layers = int(config.num_hidden_layers)
    lora = LoraSettings()
    full = AutoModelForCausalLM.from_pretrained(base)
    full_params = [p.detach() for p in full.parameters()]
    full_bytes = sum(p.numel() * p.element_size() for p in full_params)
    shape = RealConfig(
        "tiny",
        config.model_type,
        config.hidden_size,
        config.intermediate_size,
        layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
        False,
        1e-5,
        1e4,
        1024,
    )
    print(f"== 1. tiny base ({layers} layers x hidden {config.hidden_size}, {base}) ==")
    print(f"full model: {sum(p.numel() for p in full_params):,} parameters, {full_bytes:,} bytes fp32")
    print(f"LoRA rank {lora.rank}, alpha {lora.alpha}, targets {','.join(lora.target_modules)}")
    for span in (SpanRange(start=0, end=layers), SpanRange(start=0, end=layers // 2)):
        module = attach_lora(load_span(base, span), lora)
        grads = [torch.randn_like(p) for p in lora_parameters(module).values()]  # a gradient has the same shape
        lora_bytes = sum(g.numel() * g.element_size() for g in grads)
        expected = lora_param_count(shape, lora.rank, lora.target_modules, len(span)) * 4
        assert lora_bytes == expected, f"LoRA bytes {lora_bytes} != formula {expected}"
        print(f"span {span.name}: LoRA {lora_bytes // 4:,} parameters = {lora_bytes:,} bytes fp32 (formula agrees)")
        for n in peers:
            lora_sent, lora_max = measured_allreduce_bytes(grads, n, NoCompression())
            lora_fp16, _ = measured_allreduce_bytes(grads, n, Float16Compression())
            full_sent, _ = measured_allreduce_bytes(full_params, n, NoCompression())
            print(
                f"  n={n}: LoRA all-reduce sends {lora_sent:,.0f} B/peer/epoch (busiest peer {lora_max:,}; "
                f"formula 2(n-1)/n*V = {butterfly_bytes_per_peer(lora_bytes, n):,.0f}; with fp16 grad compression "
                f"{lora_fp16:,.0f}); full-model fp32 all-reduce {full_sent:,.0f} B: LoRA is "
                f"{lora_sent / full_sent:.4f}x (1/{full_sent / lora_sent:.0f})"
            )
    tok_texts = generate("finetune", 200, seed=1)
    from transformers import AutoTokenizer

    ids = pack(tok_texts, AutoTokenizer.from_pretrained(base), 64)[:8]
    first = load_span(base, SpanRange(start=0, end=layers // 2))
    with torch.no_grad():
        activation = first(full.get_input_embeddings()(ids))
    return activation


def real_shapes_section(peers: list[int]) -> None:
    print("\n== 2. real shapes (published configs, computed; fp32 gradients) ==")
    n_show = max(peers)
    print(
        f"bytes one peer sends per epoch, n=2 peers per span group (= V) and n={n_show} "
        f"(2(n-1)/n V); full model = fp32 all-reduce of every parameter's gradient (data parallelism)"
    )
    header = (
        f"{'model':<12} {'targets':<10} {'r':>3} {'LoRA params':>13} {'LoRA MB':>9} {'half-span MB':>13} "
        f"{'n=2 MB':>9} {f'n={n_show} MB':>9} {'full fp32 n=2 MB':>17} {'full/LoRA':>10}"
    )
    print(header)
    for cfg in (LLAMA3_8B, QWEN25_7B):
        total = param_count(cfg)
        full_bytes = total * 4
        for targets, label in ((QKVO, "q,k,v,o"), (ALL_LINEAR, "all-linear")):
            for rank in (8, 16):
                lora = lora_param_count(cfg, rank, targets)
                half = lora_param_count(cfg, rank, targets, cfg.num_hidden_layers // 2)
                v = lora * 4
                print(
                    f"{cfg.name:<12} {label:<10} {rank:>3} {lora:>13,} {v / MB:>9.1f} {half * 4 / MB:>13.1f} "
                    f"{butterfly_bytes_per_peer(v, 2) / MB:>9.1f} {butterfly_bytes_per_peer(v, n_show) / MB:>9.1f} "
                    f"{butterfly_bytes_per_peer(full_bytes, 2) / MB:>17,.0f} {full_bytes / v:>10.0f}"
                )
        print(f"{cfg.name}: {total:,} parameters, full fp32 gradient {full_bytes / 1e9:.2f} GB")


def decode(msg: runtime_pb2.Tensor) -> torch.Tensor:
    """``deserialize_torch_tensor``, with the 8-bit formats decoded here.

    hivemind 1.1.12 reads the 8-bit codebook length with ``int(np.frombuffer(..., count=1))``, deprecated since
    numpy 1.25 and a TypeError in this venv's numpy 2.4.6, so ``deserialize_torch_tensor`` fails on QUANTILE_8BIT, UNIFORM_8BIT and
    BLOCKWISE_8BIT here. The buffer layouts are hivemind's (``compression/quantization.py``).
    """
    buf, shape = msg.buffer, tuple(msg.size)
    if msg.compression in (CompressionType.UNIFORM_8BIT, CompressionType.QUANTILE_8BIT):
        size = int(np.frombuffer(buf, count=1, dtype=np.int64)[0])
        codebook = torch.as_tensor(np.frombuffer(buf, offset=8, count=size, dtype=np.float32))
        idx = torch.as_tensor(np.frombuffer(buf, offset=8 + 4 * size, dtype=np.uint8), dtype=torch.int64)
        return codebook[idx].reshape(shape)
    if msg.compression == CompressionType.BLOCKWISE_8BIT:
        from bitsandbytes.functional import dequantize_blockwise

        n_absmax, n_code = (int(v) for v in np.frombuffer(buf, count=2, dtype=np.int64))
        absmax = torch.as_tensor(np.frombuffer(buf, offset=16, count=n_absmax, dtype=np.float32))
        code = torch.as_tensor(np.frombuffer(buf, offset=16 + 4 * n_absmax, count=n_code, dtype=np.float32))
        q = torch.as_tensor(np.frombuffer(buf, offset=16 + 4 * (n_absmax + n_code), dtype=np.uint8)).reshape(shape)
        return dequantize_blockwise(q, absmax=absmax, code=code, blocksize=4096, nested=False)
    return deserialize_torch_tensor(msg)


def hivemind_8bit_decode_works() -> str:
    """'yes', or the error hivemind's own deserializer raises on an UNIFORM_8BIT tensor."""
    try:
        deserialize_torch_tensor(serialize_torch_tensor(torch.randn(64), CompressionType.UNIFORM_8BIT))
    except Exception as exc:  # report whatever it is: this is the finding
        return f"no: {type(exc).__name__}: {exc}"
    return "yes"


def activation_section(activation: torch.Tensor, hidden_sizes: dict[str, int], batch: int, seq: int, reps: int) -> None:
    from hivemind.compression import base as compression_base

    print("\n== 3. activations per span hop (hivemind.compression.serialize_torch_tensor) ==")
    print(
        "per token, remote span and micro-batch, peer/transport.py moves 5 hidden-size tensors: forward request "
        "(input) and reply (output), backward request (input again: the server recomputes, + output gradient) and "
        "reply (input gradient), each with the round's wire.compression (default none: fp32)"
    )
    real = activation.float()
    tokens = batch * seq
    kinds: list[tuple[str, torch.dtype, int, bool]] = [("fp32 NONE", torch.float32, CompressionType.NONE, True)]
    kinds += [("bf16 NONE (legacy=1)", torch.bfloat16, CompressionType.NONE, True)]
    kinds += [("bf16 NONE (legacy=0)", torch.bfloat16, CompressionType.NONE, False)]
    kinds += [(name, torch.float32, CompressionType.Value(name), True) for name in CompressionType.keys()[1:]]
    print(f"hivemind's own 8-bit deserializer works with numpy {np.__version__}: {hivemind_8bit_decode_works()}")
    print(
        f"real hidden states of the tiny base (span 0 output), tiled along hidden to [{batch}, {seq}, H]; "
        f"rel. err = ||decode(x) - x|| / ||x||; time = serialize + decode at the largest H, median of {reps}"
    )
    largest = max(hidden_sizes.values())
    print(
        f"{'wire format':<22} "
        + " ".join(f"{f'{n} H={h}':>24}" for n, h in hidden_sizes.items())
        + "  vs fp32  rel. err   time"
    )
    base_time = None
    for label, dtype, ctype, legacy in kinds:
        compression_base.USE_LEGACY_BFLOAT16 = legacy
        row: list[float] = []
        err, times = 0.0, []
        for h in hidden_sizes.values():
            x = real[:batch, :seq].repeat(1, 1, -(-h // real.shape[-1]))[..., :h].contiguous().to(dtype)
            row.append(serialize_torch_tensor(x, ctype).ByteSize() / tokens)
            if h == largest:
                for _ in range(reps):
                    started = time.perf_counter()
                    back = decode(serialize_torch_tensor(x, ctype))
                    times.append(time.perf_counter() - started)
                err = float(
                    (back.float() - real_tiled(real, batch, seq, h)).norm() / real_tiled(real, batch, seq, h).norm()
                )
        compression_base.USE_LEGACY_BFLOAT16 = True
        t = sorted(times)[len(times) // 2]
        base_time = base_time or t
        print(
            f"{label:<22} "
            + " ".join(f"{b:>18,.1f} B/tok" for b in row)
            + f"  {row[-1] / (4 * largest):>6.3f}x  {err:.2e}  {t * 1e3:5.1f} ms ({t / base_time:.1f}x)"
        )


def real_tiled(real: torch.Tensor, batch: int, seq: int, h: int) -> torch.Tensor:
    return real[:batch, :seq].repeat(1, 1, -(-h // real.shape[-1]))[..., :h].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="2,4,8", help="comma-separated peer counts of a span group")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences in the activation tensor")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence in the activation tensor")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--reps", type=int, default=5, help="timed serialize + decode repetitions per format")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peers = [int(x) for x in args.peers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-comm-") as tmp:
        base = make_base(Path(tmp) / "base", progress=False)
        activation = tiny_base_section(base, peers)
    real_shapes_section(peers)
    hidden = {"tiny": activation.shape[-1], "Qwen2.5-0.5B": 896, "TinyLlama": 2048, "Llama-3-8B": 4096}
    activation_section(activation, hidden, args.micro_batch, args.seq, args.reps)


if __name__ == "__main__":
    main()
