"""Held-out loss of base + a LoRA state, measured on one machine with plain transformers + PEFT."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from swarm.adapter import write_peft_dir
from swarm.config import RoundSpec
from swarm.data import load_round_data, load_texts, pack


def held_out(spec: RoundSpec, tokenizer: Any, eval_data: str, max_sequences: int) -> torch.Tensor:
    """The round's held-out sequences (or those of ``eval_data``), the first ``max_sequences``."""
    if eval_data:
        seqs = pack(load_texts(eval_data), tokenizer, spec.data.seq_len)
    else:
        _, seqs = load_round_data(spec.data, tokenizer)
    return seqs[:max_sequences]


def mean_loss(model: Any, sequences: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over ``sequences`` (weighted by sequences per batch)."""
    total = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            ids = sequences[i : i + batch_size].to(model.device)
            total += float(model(input_ids=ids, labels=ids).loss) * len(ids)
    return total / len(sequences)


def adapter_loss(
    spec: RoundSpec, tensors: Mapping[str, torch.Tensor] | None, sequences: torch.Tensor, batch_size: int, device: str
) -> float:
    """Loss of the base model with the LoRA ``tensors`` (PEFT keys) applied; the bare base for None."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(spec.base.path, torch_dtype=torch.float32)
    model = model.to(device)
    if tensors is not None:
        with tempfile.TemporaryDirectory(prefix="loraswarm-eval-") as tmp:
            write_peft_dir(Path(tmp), tensors, spec.lora, spec.base.path)
            model = PeftModel.from_pretrained(model, tmp).to(device)
            return mean_loss(model, sequences, batch_size)
    return mean_loss(model, sequences, batch_size)


__all__ = ["adapter_loss", "held_out", "mean_loss"]
