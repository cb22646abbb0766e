"""Held-out loss after the same samples and optimizer steps: centralized PEFT LoRA, federated LoRA baselines, swarm.

* ``centralized``: one ``PeftModel`` on the whole tiny base; each optimizer step sees the global batch (the K
  shards' local batches of that step, concatenated), as micro-batches whose gradients are averaged, then AdamW.
  This is what the swarm must match (DESIGN.md: "the published adapter equals centralized PEFT LoRA").
* ``fedavg``: K clients (the trainers), each with its own ``PeftModel`` and AdamW, take H local steps on its shard
  (local batch = global batch / K), then lora_A and lora_B are averaged *separately*, weighted by samples, and
  sent back: what FedAvg over PEFT adapters (e.g. FlowerTune) does. mean(B) mean(A) != mean(B A), so it is not
  the centralized update even at H = 1 (nor is an average of Adam steps an Adam step on the averaged gradient).
* ``fedavg-frozen-A``: the same with lora_A frozen at its shared initialisation: averaging B is then exactly
  averaging the weight update B A (FFA-LoRA); the remaining gap is local steps and Adam.
* ``swarm`` (``--run-swarm``): the same round on real ``swarm peer`` processes (2 spans x 2 replicas, K trainers,
  :func:`run_swarm_round`), its adapter assembled from the replicas' span states and loaded with plain PEFT; next
  to it, centralized PEFT trained on exactly the micro-batches the trainers declared for each step (the trainers
  draw their own micro-batch order, so this, not ``centralized``, is the like-for-like reference). Or evaluate a
  published adapter with ``--swarm-adapter DIR``.

Every run sees the same rows in the same steps; every client does ``--steps`` optimizer steps, so all runs use
steps x target batch samples. Data is ``swarm make-data``'s (finetune domain), base is ``swarm make-base``'s.

    python -m bench.bench_quality [--steps 48] [--clients 2] [--local-steps 1,4,12] [--swarm-adapter DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.basemodel import make_base
from swarm.config import (
    BaseModelRef,
    DataSettings,
    EndCondition,
    LoraSettings,
    OptimizerSettings,
    RoundSpec,
    split_even,
)
from swarm.corpus import generate, write_jsonl
from swarm.data import batches, load_round_data
from swarm.lora import init_lora_, lora_parameters, peft_lora_config


@dataclass(frozen=True)
class Setup:
    """What every run shares: base, data shards, held-out rows and the optimizer settings."""

    base: Path
    spec: RoundSpec
    shards: list[torch.Tensor]
    eval_rows: torch.Tensor
    steps: int

    @property
    def local_batch(self) -> int:
        return self.spec.optimizer.target_batch_size // len(self.shards)


def round_spec(
    workdir: Path, base: Path, n_train: int, n_eval: int, steps: int, target_batch: int, lr: float = 3e-3
) -> RoundSpec:
    """The round both the baselines and the swarm run: ``swarm make-data`` files, the demo's optimizer settings."""
    from swarm.checkpoint import fingerprint, read_config

    texts = generate("finetune", n_train + n_eval, seed=0)  # what `swarm make-data` writes
    train = write_jsonl(texts[:n_train], workdir / "data" / "train.jsonl")
    eval_ = write_jsonl(texts[n_train:], workdir / "data" / "eval.jsonl")
    layers = int(read_config(base).num_hidden_layers)
    return RoundSpec(
        round_id="quality",
        base=BaseModelRef(path=str(base), fingerprint=fingerprint(base), num_layers=layers),
        spans=split_even(layers, 2),
        lora=LoraSettings(),
        data=DataSettings(train_path=str(train), eval_path=str(eval_), seq_len=64, micro_batch_size=8),
        optimizer=OptimizerSettings(lr=lr, target_batch_size=target_batch),
        end=EndCondition(target_epochs=steps),
    )


def local_batches(shard: torch.Tensor, size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of one shard (reshuffled each pass, ``swarm.data.batches`` order)."""
    epoch = 0
    while True:
        yield from batches(shard, size, seed, epoch, drop_last=True)
        epoch += 1


def step_batches(setup: Setup) -> Iterator[list[torch.Tensor]]:
    """For each optimizer step, every client's local batch (the centralized run concatenates them)."""
    its = [local_batches(s, setup.local_batch, setup.spec.data.seed + k) for k, s in enumerate(setup.shards)]
    for _ in range(setup.steps):
        yield [next(it) for it in its]


def new_model(setup: Setup, freeze_a: bool = False) -> tuple[PeftModel, torch.optim.Optimizer]:
    model: PeftModel = get_peft_model(  # type: ignore[assignment]  # a PeftModel for a plain LoraConfig
        AutoModelForCausalLM.from_pretrained(setup.base, attn_implementation="sdpa"), peft_lora_config(setup.spec.lora)
    )
    init_lora_(lora_parameters(model), setup.spec.lora.init_seed)
    if freeze_a:
        for key, p in lora_parameters(model).items():
            p.requires_grad_(".lora_A." not in key)
    return model, new_optimizer(setup, model)


def new_optimizer(setup: Setup, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The span servers' optimizer (peer/server.py): AdamW with the round's lr and weight decay."""
    opt = setup.spec.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rows: torch.Tensor, micro: int) -> None:
    """Mean of the micro-batches' gradients (hivemind's accumulation), then one optimizer step."""
    chunks = rows.split(micro)
    for ids in chunks:
        (model(input_ids=ids, labels=ids).loss / len(chunks)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, rows: torch.Tensor, batch: int = 32) -> float:
    """Mean next-token cross-entropy over every held-out row (all rows have the same length)."""
    model.eval()
    total = sum(float(model(input_ids=ids, labels=ids).loss) * len(ids) for ids in rows.split(batch))
    model.train()
    return total / len(rows)


def centralized_peft(setup: Setup, freeze_a: bool = False, save_to: Path | None = None) -> float:
    """Single-process PEFT LoRA: one AdamW step per global batch (``freeze_a``: B only, the FFA-LoRA reference).

    ``save_to``: also write the trained adapter there (plain PEFT ``save_pretrained``).
    """
    model, optimizer = new_model(setup, freeze_a)
    model.train()
    for parts in step_batches(setup):
        train_step(model, optimizer, torch.cat(parts), setup.spec.data.micro_batch_size)
    if save_to is not None:
        model.save_pretrained(str(save_to))
    return eval_loss(model, setup.eval_rows)


def fedavg_peft(setup: Setup, local_steps: int, freeze_a: bool = False, fresh_optimizer: bool = False) -> float:
    """FedAvg over PEFT adapters: ``local_steps`` steps per client, then A and B averaged separately."""
    clients = [new_model(setup, freeze_a) for _ in setup.shards]
    weights = [1.0 / len(clients)] * len(clients)  # equal local batches: sample-weighted = equal weights
    for step, parts in enumerate(step_batches(setup), start=1):
        for (model, optimizer), rows in zip(clients, parts, strict=True):
            model.train()
            train_step(model, optimizer, rows, setup.spec.data.micro_batch_size)
        if step % local_steps == 0 or step == setup.steps:
            states = [lora_parameters(model) for model, _ in clients]
            with torch.no_grad():
                for key in states[0]:
                    mean = torch.stack([w * s[key] for w, s in zip(weights, states, strict=True)]).sum(0)
                    for s in states:
                        s[key].copy_(mean)
            if fresh_optimizer:
                clients = [(m, new_optimizer(setup, m)) for m, _ in clients]
    return eval_loss(clients[0][0], setup.eval_rows)


def run_swarm_round(spec: RoundSpec, workdir: Path, num_trainers: int) -> tuple[Path, float]:
    """The round on a real swarm: 2 spans x 2 replicas, ``num_trainers`` trainers (trainer k reads shard k), real
    ``swarm peer`` processes on 127.0.0.1 until spec.end. Returns the adapter assembled from the span replicas'
    states at the last epoch (what the coordinator assembles), and the held-out loss of centralized PEFT LoRA
    trained on exactly the micro-batches the trainers declared, step by step (the exact reference)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from peer.training_loop import data_stream
    from swarm.adapter import write_peft_dir
    from swarm.adapter_tensors import merge_span_states
    from swarm.reference import centralized_lora

    steps = spec.end.target_epochs
    spec = spec.model_copy(update={"optimizer": spec.optimizer.model_copy(update={"matchmaking_time": 1.0})})
    spec_path = workdir / "swarm_round.json"
    spec.save(spec_path)
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(name: str, *args: str) -> Path:
        folder = workdir / "swarm" / name
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "swarm.cli", "peer", "--round-spec", str(spec_path), "--device", "cpu"]
        cmd += ["--threads", "1", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--announce-period", "1"]
        cmd += ["--events-file", str(folder / "events.jsonl"), "--checkpoint-dir", str(folder / "ckpt"), *args]
        with open(folder / "log.txt", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((name, proc, folder))
        return folder

    def events(folder: Path, kind: str) -> list[dict]:
        path = folder / "events.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [r for r in rows if r["event"] == kind]

    def wait(check: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            if time.monotonic() > deadline or any(p.poll() is not None for _, p, _ in procs):
                raise RuntimeError(f"swarm round: {what} did not happen; see {workdir / 'swarm'}")
            time.sleep(0.5)

    try:
        first = start("s0", "--span-index", "0")
        wait(lambda: events(first, "ready"), 120, "the first server to start")
        boot = ["--initial-peers", events(first, "ready")[0]["maddrs"][0]]
        start("s1", "--span-index", "1", *boot)
        train = spec.data.train_path
        trainers = []
        for k in range(num_trainers):
            args = ["--span-index", str(k % 2), "--data", train, "--shard-index", str(k), "--num-shards"]
            args += [str(num_trainers), "--min-replicas", "2", "--min-trainers", str(num_trainers), *boot]
            trainers.append(start(f"t{k}", *args))
        wait(lambda: all(len(events(t, "eval")) >= 2 for t in trainers), 60 + 20 * steps, "training to finish")
        servers = [workdir / "swarm" / "s0", workdir / "swarm" / "s1"]
        snaps = [sorted((f / "ckpt").glob(f"span*_epoch{steps:05d}.safetensors")) for f in servers]
        wait(lambda: all(sorted((f / "ckpt").glob(f"span*_epoch{steps:05d}.safetensors")) for f in servers), 60, "")
        snaps = [sorted((f / "ckpt").glob(f"span*_epoch{steps:05d}.safetensors")) for f in servers]
        state = merge_span_states([load_file(str(s[0])) for s in snaps], spec.spans)
        out = workdir / "swarm_adapter"
        write_peft_dir(out, state, spec.lora, str(spec.base.path))
        # the exact reference: centralized PEFT on the micro-batches each step declared
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec.base.path)
        per_step: list[list[torch.Tensor]] = [[] for _ in range(steps)]
        for k, t in enumerate(trainers):
            rows, _ = load_round_data(spec.data, tokenizer, k, num_trainers)
            stream = data_stream(rows, spec.data.micro_batch_size, seed=0)
            declared = {e["step"]: e for e in events(t, "step")}
            upto = max(mb["batch_no"] for e in declared.values() for mb in e["microbatches"])
            data = [next(stream) for _ in range(upto + 1)]
            for s_, e in declared.items():
                per_step[s_] += [data[mb["batch_no"]] for mb in e["microbatches"]]
        _, eval_rows = load_round_data(spec.data, tokenizer, 0, 1)
        _, exact = centralized_lora(spec, per_step, eval_rows)
        return out, float(exact or 0.0)
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc, _ in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def swarm_adapter_loss(setup: Setup, adapter_dir: Path) -> float:
    """Held-out loss of a published adapter, loaded with nothing but transformers + peft."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup.base), str(adapter_dir))
    return eval_loss(model, setup.eval_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=48, help="optimizer steps of every run (each client's too)")
    parser.add_argument("--clients", type=int, default=2, help="trainers / FedAvg clients (data shards)")
    parser.add_argument("--target-batch", type=int, default=32, help="samples per optimizer step, all clients")
    parser.add_argument("--local-steps", default="1,4,12", help="FedAvg local steps between averagings (list)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of every run (the demo's 3e-3)")
    parser.add_argument("--n-train", type=int, default=2000, help="training documents (swarm make-data --n-train)")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out documents (swarm make-data --n-eval)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 on a loaded 2-core machine ran 10x slower)"
    )
    parser.add_argument("--fresh-optimizer", action="store_true", help="FedAvg: new AdamW each round (FlowerTune)")
    parser.add_argument("--no-frozen-a", action="store_true", help="skip the frozen-A (B only) runs")
    parser.add_argument("--swarm-adapter", type=Path, help="evaluate this published adapter as the swarm's result")
    parser.add_argument(
        "--save-centralized", type=Path, help="write the centralized adapter here (a reference for the swarm's)"
    )
    parser.add_argument("--run-swarm", action="store_true", help="also run the round on a real swarm (2x2, real peers)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep base, data and round.json here (default: a temp dir, removed)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.workdir is not None:
        run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
            run(args, Path(tmp))


def run(args: argparse.Namespace, workdir: Path) -> None:
    base = make_base(workdir / "base", progress=False)
    spec = round_spec(workdir, base, args.n_train, args.n_eval, args.steps, args.target_batch, args.lr)
    spec.save(workdir / "round.json")
    tokenizer = AutoTokenizer.from_pretrained(base)
    shards, eval_rows = [], None
    for k in range(args.clients):
        shard, eval_rows = load_round_data(spec.data, tokenizer, k, args.clients)
        shards.append(shard)
    assert eval_rows is not None
    setup = Setup(base, spec, shards, eval_rows, args.steps)
    print(
        f"tiny base {base}; {sum(len(s) for s in shards)} training rows in {args.clients} shards, "
        f"{len(eval_rows)} held-out rows of {spec.data.seq_len} tokens; {args.steps} AdamW steps (lr "
        f"{spec.optimizer.lr}) of {args.target_batch} samples = {args.steps * args.target_batch} samples per run; "
        f"LoRA r{spec.lora.rank} alpha {spec.lora.alpha} on {','.join(spec.lora.target_modules)}"
    )
    before, _ = new_model(setup)
    print(f"{'base model (no LoRA training)':<52} held-out loss {eval_loss(before, eval_rows):.4f}")
    started = time.perf_counter()
    central = centralized_peft(setup, save_to=args.save_centralized)
    print(
        f"{'centralized PEFT LoRA (reference)':<52} held-out loss {central:.4f}  ({time.perf_counter() - started:.0f} s)"
    )
    variants = [(False, "FedAvg A,B separately")]
    if not args.no_frozen_a:
        variants.append((True, "FedAvg frozen A (B only)"))
        central_frozen = centralized_peft(setup, freeze_a=True)
        print(
            f"{'centralized PEFT LoRA, frozen A (B only)':<52} held-out loss {central_frozen:.4f}  "
            f"{100 * (central_frozen - central) / central:+.2f}% vs centralized"
        )
    fresh = " fresh AdamW/round" if args.fresh_optimizer else ""
    for h in (int(x) for x in args.local_steps.split(",")):
        for freeze_a, label in variants:
            loss = fedavg_peft(setup, h, freeze_a, args.fresh_optimizer)
            name = f"{label}, H={h}{fresh}"
            print(f"{name:<52} held-out loss {loss:.4f}  {100 * (loss - central) / central:+.2f}% vs centralized")
    adapter = args.swarm_adapter
    if args.run_swarm:
        started = time.perf_counter()
        adapter, exact = run_swarm_round(spec, workdir, args.clients)
        print(
            f"{'centralized PEFT on the swarm steps (exact reference)':<52} held-out loss {exact:.4f}  "
            f"{100 * (exact - central) / central:+.2f}% vs centralized  (swarm round {time.perf_counter() - started:.0f} s)"
        )
    if adapter is not None:
        loss = swarm_adapter_loss(setup, adapter)
        print(
            f"{'swarm adapter ' + str(adapter):<52} held-out loss {loss:.4f}  {100 * (loss - central) / central:+.2f}%"
        )
    else:
        print("swarm: not run (--run-swarm runs it; --swarm-adapter DIR evaluates a published adapter)")


if __name__ == "__main__":
    main()
