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
* ``swarm``: the adapter the swarm publishes for the same round spec (:func:`round_spec`). HOOK for the lead:
  :func:`run_swarm_round` (the swarm-wide step), or pass a published adapter with ``--swarm-adapter DIR``.

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


# ---------------------------------------------------------------------------------------------------------------
# HOOK (lead): the swarm's published adapter for the same round. Run `spec` with 2 spans x 2 replicas and
# len(setup.shards) trainers (trainer k reads shard k: swarm.data.load_round_data(spec.data, tok, k, K)) until
# spec.end (= setup.steps swarm-wide optimizer steps of target_batch_size samples), and return the published
# adapter directory. Everything after that (loading with plain PeftModel.from_pretrained, evaluation on the same
# held-out rows, the ratio to centralized) is done by swarm_adapter_loss() and main().
# ---------------------------------------------------------------------------------------------------------------
def run_swarm_round(spec: RoundSpec, workdir: Path, num_trainers: int) -> Path:
    raise NotImplementedError("run_swarm_round is a hook to fill (bench/bench_quality.py); or pass --swarm-adapter DIR")


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
    parser.add_argument("--run-swarm", action="store_true", help="run the swarm round (run_swarm_round hook)")
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
        adapter = run_swarm_round(spec, workdir, args.clients)
    if adapter is not None:
        loss = swarm_adapter_loss(setup, adapter)
        print(
            f"{'swarm adapter ' + str(adapter):<52} held-out loss {loss:.4f}  {100 * (loss - central) / central:+.2f}%"
        )
    else:
        print("swarm: not run (hook run_swarm_round not filled yet; --swarm-adapter DIR evaluates a published adapter)")


if __name__ == "__main__":
    main()
