"""Centralized PEFT LoRA training of a round's model: the reference the swarm must reproduce (tests, bench)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from swarm.config import RoundSpec
from swarm.lora import init_lora_, lora_parameters, peft_lora_config


def centralized_lora(
    spec: RoundSpec, steps: Sequence[Sequence[torch.Tensor]], eval_set: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], float | None]:
    """Train PEFT LoRA on the full base in one process: one optimizer step per entry of ``steps``.

    Each step averages the loss over its samples (every micro-batch's mean token loss weighted by its sequences),
    like one swarm-wide step. Returns the LoRA state (PEFT keys) and, with ``eval_set``, its held-out loss.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from swarm.checkpoint import resolve_checkpoint

    base = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(spec.base.path), dtype=torch.float32)
    model = get_peft_model(base, peft_lora_config(spec.lora))
    params = lora_parameters(model)
    init_lora_(params, spec.lora.init_seed)
    opt = spec.optimizer
    trainable = list(params.values())
    optimizer = (
        torch.optim.AdamW(trainable, lr=opt.lr, weight_decay=opt.weight_decay)
        if opt.name == "adamw"
        else torch.optim.SGD(trainable, lr=opt.lr, weight_decay=opt.weight_decay)
    )
    model.train()
    for micro_batches in steps:
        total = sum(int(ids.shape[0]) for ids in micro_batches)
        for ids in micro_batches:
            (model(input_ids=ids, labels=ids).loss * (int(ids.shape[0]) / total)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = {k: p.detach().clone() for k, p in params.items()}
    loss = None
    if eval_set is not None:
        with torch.no_grad():
            total_loss, count = 0.0, 0
            bs = spec.data.micro_batch_size
            for i in range(0, len(eval_set), bs):
                ids = eval_set[i : i + bs]
                total_loss += float(model(input_ids=ids, labels=ids).loss) * len(ids)
                count += len(ids)
            loss = total_loss / max(count, 1)
    return state, loss
