"""Supported decoder architectures and the module names LoRA may target (no torch import)."""

from __future__ import annotations

#: ``config.json`` ``model_type`` -> linear modules inside one decoder block that LoRA may target.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}

#: Every module name that any supported architecture exposes to LoRA.
ALL_TARGET_MODULES: tuple[str, ...] = tuple(sorted({m for ms in SUPPORTED_ARCHITECTURES.values() for m in ms}))


def check_architecture(model_type: str) -> tuple[str, ...]:
    """Return the targetable modules of ``model_type`` or raise ``ValueError`` naming the allowed values."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        allowed = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise ValueError(f"unknown architecture model_type={model_type!r}; allowed values: {allowed}")
    return SUPPORTED_ARCHITECTURES[model_type]
