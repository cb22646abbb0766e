"""LoRA on a span (PEFT layers), deterministic initialisation, and export/import in PEFT's saved key format.

Every LoRA tensor is named as PEFT saves it for the full causal LM, e.g.
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``, whether it lives in a span or in a full
``PeftModel``; that is what lets span states be assembled into one adapter and lets replicas agree.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from swarm.arch import check_architecture
from swarm.config import LoraSettings
from swarm.quantize import compute_dtype_of

ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."
_LORA_PARAM = re.compile(r"\.lora_[AB]\.(" + ADAPTER_NAME + r")\.weight$")


def peft_lora_config(lora: LoraSettings, base_model: str = "") -> LoraConfig:
    """The ``peft.LoraConfig`` equivalent of ``lora`` (the one written to ``adapter_config.json``)."""
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT accepts float alpha
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model or None,
    )


def _to_peft_key(module_name: str, prefix: str) -> str:
    """Map a parameter name of a span / PeftModel to PEFT's saved key (adapter name removed)."""
    return prefix + module_name.replace(f".{ADAPTER_NAME}.weight", ".weight")


def _generator_for(key: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def init_lora_(named: dict[str, nn.Parameter], seed: int) -> None:
    """Initialise LoRA deterministically from (seed, PEFT key): A kaiming-uniform like PEFT, B zero.

    Every replica, and a full ``PeftModel`` used as reference, gets bit-identical starting weights.
    """
    with torch.no_grad():
        for key, param in named.items():
            if ".lora_A." in key:
                bound = 1.0 / math.sqrt(param.shape[1])  # kaiming_uniform(a=sqrt(5)) on [r, in]
                values = torch.rand(param.shape, generator=_generator_for(key, seed), dtype=torch.float64)
                param.copy_((values * 2 - 1) * bound)
            else:
                param.zero_()


def attach_lora(span: nn.Module, lora: LoraSettings) -> nn.Module:
    """Inject trainable LoRA layers into ``span`` (a :class:`swarm.span.Span`) and initialise them."""
    model_type: str = getattr(span, "config").model_type  # noqa: B009 (nn.Module attributes are untyped)
    allowed = check_architecture(model_type)
    unknown = [m for m in lora.target_modules if m not in allowed]
    if unknown:
        raise ValueError(
            f"lora.target_modules {unknown} do not exist in {model_type} blocks; allowed values: {', '.join(allowed)}"
        )
    inject_adapter_in_model(peft_lora_config(lora), span, adapter_name=ADAPTER_NAME)
    for name, param in span.named_parameters():
        param.requires_grad_(bool(_LORA_PARAM.search(name)))
    if getattr(span, "quantize", "none") != "none":  # PEFT leaves LoRA over 8-bit layers in fp32: use the compute dtype
        dtype = compute_dtype_of(span)
        for param in lora_parameters(span).values():
            param.data = param.data.to(dtype)
    init_lora_(lora_parameters(span), lora.init_seed)
    return span


def _prefix_for(model: nn.Module) -> str:
    # A span's blocks are ``layers.<i>``; a PeftModel's are ``base_model.model.model.layers.<i>``.
    return "" if type(model).__name__.startswith("Peft") else PEFT_PREFIX + "model."


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """LoRA parameters by PEFT key, sorted, so every replica lists them in the same order."""
    prefix = _prefix_for(model)
    found = {_to_peft_key(n, prefix): p for n, p in model.named_parameters() if _LORA_PARAM.search(n)}
    if not found:
        raise ValueError("model has no LoRA parameters: call attach_lora first")
    return dict(sorted(found.items()))


def export_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached fp32 CPU copy of the LoRA weights, keyed in PEFT's saved format."""
    return {k: p.detach().to("cpu", torch.float32).contiguous().clone() for k, p in lora_parameters(model).items()}


def import_lora_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load LoRA weights; the keys must match exactly, shapes must agree and values must be finite.

    Validates everything before writing anything, so a bad state leaves the model unchanged.
    """
    params = lora_parameters(model)
    missing, unexpected = params.keys() - tensors.keys(), tensors.keys() - params.keys()
    if missing or unexpected:
        raise KeyError(
            f"LoRA state does not match this model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]} (different span, rank or target modules?)"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"LoRA tensor {key} has shape {tuple(value.shape)}, expected {tuple(params[key].shape)}")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(f"LoRA tensor {key} is not a finite floating-point tensor")
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)
