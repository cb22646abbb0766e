"""Tokens/s of swarm training vs plain single-process PEFT LoRA training, measured in the same run.

(a) one peer hosting the whole model (its trainer runs the span in-process; swarm-wide steps through its group)
(b) two peers with two spans (the trainer hosts span 0; span 1 is called over the direct p2p transport)
Both are reported as ratios to plain PEFT at its best on the same cores, model, data, micro-batches and steps: the
better of one process with --baseline-threads intra-op threads and two one-thread processes with torch DDP (gloo).

Two references say what bounds (a) and (b) on the machine that runs the bench (they are not baselines):
- plain PEFT as two one-thread micro-batch streams in one process (Python threads): what any one-process peer can
  reach against DDP's two interpreters;
- the transport's floor: CPU time (this process and both p2pd daemons) of one call through hivemind's p2p layer
  that carries a micro-batch's activations each way, decoded and encoded as the span transport does, no compute.
  A micro-batch of (b) makes two such calls (forward, backward), so on C cores (b) can reach at most
  compute / (compute + 2 x floor) of DDP, even with every core busy and nothing else to do.

    python bench/bench_throughput.py [--steps 40] [--threads 2] [--layers 4] [--hidden 64] [--pipeline-depth 2]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path
from typing import AsyncIterator  # noqa: UP035 (hivemind's ServicerBase reads typing's hints)

import torch
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peer.inprocess import InProcessSwarm
from peer.trainer import ChainTrainer, Router
from peer.transport import decode_parts, encode
from swarm.basemodel import make_base
from swarm.config import BaseModelRef, DataSettings, OptimizerSettings, RoundSpec, SpanRange
from swarm.lora import init_lora_, lora_parameters, peft_lora_config
from swarm.span import load_trainer_head
from swarm.steps import slots_per_step


def batches(steps: int, batch: int, seq: int, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(4, vocab, (batch, seq), generator=gen) for _ in range(steps)]


def peft_model(base: Path | str, spec: RoundSpec) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Plain PEFT LoRA on the base, initialised as the round initialises its adapter, and its AdamW."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa"), peft_lora_config(spec.lora)
    )
    init_lora_(lora_parameters(model), spec.lora.init_seed)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.optimizer.lr)


def bench_peft(base: Path, spec: RoundSpec, data: list[torch.Tensor], warmup: int) -> float:
    """Plain PEFT: accumulate micro-batches to the round's target batch, then one AdamW step (what a round does)."""
    model, opt = peft_model(base, spec)
    accumulated = 0
    for i, ids in enumerate(data):
        if i == warmup:
            started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        accumulated += len(ids)
        if accumulated >= spec.optimizer.target_batch_size:
            opt.step()
            opt.zero_grad()
            accumulated = 0
    return sum(x.numel() for x in data[warmup:]) / (time.perf_counter() - started)


def bench_peft_threads(base: Path, spec: RoundSpec, data: list[torch.Tensor], warmup: int) -> float:
    """Plain PEFT as two one-thread micro-batch streams in one process (Python threads, one shared model): what a
    one-process peer can reach at best (the threads share one interpreter lock)."""
    model, opt = peft_model(base, spec)
    per_step = max(1, spec.optimizer.target_batch_size // spec.data.micro_batch_size)

    def stream(mbs: list[torch.Tensor]) -> None:
        for ids in mbs:
            model(input_ids=ids, labels=ids).loss.backward()  # autograd accumulates into .grad under its own lock

    started = time.perf_counter()
    warm = warmup // per_step * per_step
    for s in range(0, len(data) // per_step * per_step, per_step):
        if s == warm:
            started = time.perf_counter()
        chunk = data[s : s + per_step]
        threads = [threading.Thread(target=stream, args=(chunk[k::2],)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        opt.step()
        opt.zero_grad()
    timed = data[warm : len(data) // per_step * per_step]
    return sum(x.numel() for x in timed) / (time.perf_counter() - started)


class _Echo(ServicerBase):
    """Answers a span-transport-shaped request with its tensor: decode and encode, no compute."""

    async def rpc_echo(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        parts = [part async for request in requests for part in request.tensors]
        for part in encode(decode_parts(parts)[0], "none"):
            yield runtime_pb2.ExpertResponse(tensors=[part])


def transport_floor(like: torch.Tensor, calls: int = 100) -> tuple[float, float]:
    """(wall, CPU) seconds of one call through hivemind's p2p layer that sends ``like`` and gets it back, encoded
    and decoded as the span transport does, with no compute: CPU of this process and both p2pd daemons."""
    import psutil
    from hivemind.p2p import P2P

    def cpu() -> float:
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    async def run() -> tuple[float, float]:
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
        try:
            await _Echo().add_p2p_handlers(server)
            stub = _Echo.get_stub(client, server.peer_id)

            async def call() -> None:
                async def request() -> AsyncIterator[runtime_pb2.ExpertRequest]:
                    for part in encode(like, "none"):
                        yield runtime_pb2.ExpertRequest(tensors=[part])

                decode_parts([p async for r in await stub.rpc_echo(request()) for p in r.tensors])

            for _ in range(10):
                await call()
            cpu0, wall0 = cpu(), time.perf_counter()
            for _ in range(calls):
                await call()
            return (time.perf_counter() - wall0) / calls, (cpu() - cpu0) / calls
        finally:
            await client.shutdown()
            await server.shutdown()

    return asyncio.run(run())


def _ddp_worker(
    rank: int, base: str, spec_json: str, data: list[torch.Tensor], warmup: int, port: int, out: str
) -> None:
    """One of two one-thread data-parallel PEFT processes (torch DDP over gloo): half of every step's micro-batches."""
    import contextlib

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    spec = RoundSpec.from_json(spec_json)
    model, opt = peft_model(base, spec)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)  # the buffers (rotary tables) never change
    per_step = spec.optimizer.target_batch_size // spec.data.micro_batch_size
    mine = data[rank::2]  # the caller passes an even number of micro-batches: both ranks make the same calls
    local_steps = per_step // 2
    started = time.perf_counter()
    for i, ids in enumerate(mine):
        if i == warmup // 2:
            dist.barrier()
            started = time.perf_counter()
        last = (i + 1) % local_steps == 0
        with contextlib.nullcontext() if last else ddp.no_sync():
            ddp(input_ids=ids, labels=ids).loss.backward()
        if last:
            opt.step()
            opt.zero_grad()
    dist.barrier()
    if rank == 0:
        Path(out).write_text(str(time.perf_counter() - started))
    dist.destroy_process_group()


def bench_ddp(base: Path, spec: RoundSpec, data: list[torch.Tensor], warmup: int) -> float:
    """Plain PEFT as two one-thread data-parallel processes (torch DDP over gloo), same micro-batches and steps."""
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = data[: len(data) // 2 * 2]
    warmup = warmup // 2 * 2
    out = Path(tempfile.mkdtemp()) / "ddp_seconds"
    tmp.start_processes(
        _ddp_worker,
        args=(str(base), spec.to_json(), data, warmup, port, str(out)),
        nprocs=2,
        start_method="spawn",
    )
    return sum(x.numel() for x in data[warmup:]) / float(out.read_text())


def bench_swarm(base: Path, spec: RoundSpec, data: list[torch.Tensor], warmup: int, depth: int) -> float:
    """The swarm: one trainer (hosting span 0) drives swarm-wide steps through in-process span servers."""
    swarm = InProcessSwarm(spec)
    try:
        swarm.start()
        router = Router(swarm.dhts[0], spec, {spec.spans[0]: swarm.servers[0]}, timeout=60)
        trainer = ChainTrainer(spec, load_trainer_head(base), router)
        slots = slots_per_step(spec.optimizer.target_batch_size, spec.data.micro_batch_size)
        stream = iter(enumerate(data))
        warm, total = warmup // slots, len(data) // slots
        for s in range(warm):
            swarm.step(trainer, s, stream, depth)
        started = time.perf_counter()
        for s in range(warm, total):
            swarm.step(trainer, s, stream, depth)
        timed = data[warm * slots : total * slots]
        return sum(x.numel() for x in timed) / (time.perf_counter() - started)
    finally:
        swarm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="measured micro-batches per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="micro-batches run before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the swarm configurations")
    parser.add_argument(
        "--baseline-threads",
        type=int,
        default=0,
        help="torch threads of plain PEFT (default: --threads). E.g. --baseline-threads 2 --threads 1 "
        "--pipeline-depth 2 compares 2 threads with 2 one-thread micro-batches in flight",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the tiny base")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny base")
    parser.add_argument("--target-batch", type=int, default=32, help="samples per optimizer step (both sides)")
    parser.add_argument("--pipeline-depth", type=int, default=2, help="swarm trainer: micro-batches in flight")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = make_base(Path(tempfile.mkdtemp()) / "base", layers=args.layers, hidden=args.hidden, progress=False)
    from swarm.checkpoint import read_config

    vocab = int(read_config(base).vocab_size)
    data = batches(args.steps + args.warmup, args.batch, args.seq, vocab)

    def spec(cuts: list[int], name: str) -> RoundSpec:
        return RoundSpec(
            round_id=name,
            base=BaseModelRef(path=str(base), num_layers=args.layers),
            spans=tuple(SpanRange(start=a, end=b) for a, b in zip(cuts, cuts[1:], strict=False)),
            data=DataSettings(seq_len=args.seq, micro_batch_size=args.batch),
            optimizer=OptimizerSettings(target_batch_size=args.target_batch, matchmaking_time=1.0),
        )

    depth, half = args.pipeline_depth, args.layers // 2
    torch.set_num_threads(args.baseline_threads or args.threads)
    single = bench_peft(base, spec([0, args.layers], "b"), data, args.warmup)
    ddp = bench_ddp(base, spec([0, args.layers], "e"), data, args.warmup)
    baseline = max(single, ddp)
    torch.set_num_threads(1)
    threads = bench_peft_threads(base, spec([0, args.layers], "t"), data, args.warmup)
    hidden_like = torch.randn(args.batch, args.seq, args.hidden)
    floor_wall, floor_cpu = transport_floor(hidden_like)
    torch.set_num_threads(args.threads)
    one_peer = bench_swarm(base, spec([0, args.layers], "a"), data, args.warmup, depth)
    two_peers = bench_swarm(base, spec([0, half, args.layers], "c"), data, args.warmup, depth)
    two_serial = bench_swarm(base, spec([0, half, args.layers], "d"), data, args.warmup, 1) if depth > 1 else None
    print(
        f"model: {args.layers} layers x hidden {args.hidden}, micro-batch {args.batch}x{args.seq}, "
        f"optimizer step every {args.target_batch} samples, {args.steps} timed steps"
    )
    print(f"torch threads: plain PEFT {args.baseline_threads or args.threads}, swarm {args.threads} per micro-batch")
    print(f"plain PEFT, {args.baseline_threads or args.threads} intra-op threads         : {single:10.0f} tokens/s")
    print(f"plain PEFT, 2 one-thread DDP processes : {ddp:10.0f} tokens/s")
    print(f"plain PEFT at its best (baseline)      : {baseline:10.0f} tokens/s  1.00x")
    print(f"(a) one peer, whole model, depth {depth}    : {one_peer:10.0f} tokens/s  {one_peer / baseline:.2f}x")
    print(f"(b) two peers, two spans, depth {depth}     : {two_peers:10.0f} tokens/s  {two_peers / baseline:.2f}x")
    if two_serial is not None:
        print(f"    (b) with one micro-batch in flight: {two_serial:10.0f} tokens/s  {two_serial / baseline:.2f}x")
    # What bounds them (references, not baselines): see the module docstring.
    tokens = args.batch * args.seq
    compute = 2 * tokens / ddp  # CPU seconds of one micro-batch, forward + backward, one thread (a DDP rank's pace)
    ceiling = compute / (compute + 2 * floor_cpu)
    print("bounds on this machine:")
    print(
        f"  plain PEFT, 2 one-thread streams in one process: {threads:10.0f} tokens/s  {threads / baseline:.2f}x "
        f"(a) is {one_peer / threads:.2f}x of it"
    )
    print(
        f"  transport floor: one p2p call of {hidden_like.numel() * 4 / 1024:.0f} KiB each way: "
        f"{floor_wall * 1e3:.1f} ms wall, {floor_cpu * 1e3:.1f} ms CPU; one micro-batch computes in "
        f"{compute * 1e3:.0f} ms, so (b) <= {ceiling:.2f}x at full use of every core"
    )


if __name__ == "__main__":
    main()
