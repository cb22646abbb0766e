"""Published ``config.json`` values of real base models, typed in by hand (nothing is downloaded).

Each entry holds the fields that decide parameter shapes; :func:`hf_config` turns one into a ``transformers``
config, :func:`param_count` counts its parameters on the meta device (checked against the published totals
in :data:`PUBLISHED_PARAMS`), and :func:`lora_param_count` counts the LoRA parameters PEFT adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QKVO: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # the project's default (swarm.config)
ALL_LINEAR: tuple[str, ...] = QKVO + ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RealConfig:
    """Shape-defining fields of a published ``config.json``."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear module of one block."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        i = self.intermediate_size
        return {
            "q_proj": (h, self.num_attention_heads * self.head_dim),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (self.num_attention_heads * self.head_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


# meta-llama/Meta-Llama-3-8B config.json
LLAMA3_8B = RealConfig("Llama-3-8B", "llama", 4096, 14336, 32, 32, 8, 128256, False, 1e-5, 500000.0, 8192)
# Qwen/Qwen2.5-7B config.json
QWEN25_7B = RealConfig("Qwen2.5-7B", "qwen2", 3584, 18944, 28, 28, 4, 152064, False, 1e-6, 1000000.0, 131072)
# Qwen/Qwen2.5-0.5B config.json
QWEN25_05B = RealConfig("Qwen2.5-0.5B", "qwen2", 896, 4864, 24, 14, 2, 151936, True, 1e-6, 1000000.0, 32768)
# TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T (and -Chat-v1.0) config.json
TINYLLAMA_11B = RealConfig("TinyLlama-1.1B", "llama", 2048, 5632, 22, 32, 4, 32000, False, 1e-5, 10000.0, 2048)

CONFIGS: dict[str, RealConfig] = {c.name: c for c in (LLAMA3_8B, QWEN25_7B, QWEN25_05B, TINYLLAMA_11B)}

#: Total parameters as their model cards / ``num_parameters()`` give them; :func:`param_count` must match.
PUBLISHED_PARAMS: dict[str, int] = {
    "Llama-3-8B": 8_030_261_248,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen2.5-0.5B": 494_032_768,
    "TinyLlama-1.1B": 1_100_048_384,
}


def hf_config(cfg: RealConfig) -> Any:
    """The ``transformers`` config of ``cfg`` (SDPA attention, bf16 as published)."""
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
        dtype="bfloat16",
    )
    config: Any
    if cfg.model_type == "qwen2":
        config = Qwen2Config(use_sliding_window=False, max_window_layers=cfg.num_hidden_layers, **common)
    else:
        config = LlamaConfig(**common)
    config._attn_implementation = "sdpa"
    return config


def param_count(cfg: RealConfig) -> int:
    """Parameters of the whole causal LM (tied embeddings counted once), built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(cfg))
    return sum(p.numel() for p in model.parameters())


def block_param_count(cfg: RealConfig) -> int:
    """Parameters of one decoder block (linears, their biases, two RMSNorms)."""
    shapes = cfg.linear_shapes()
    weights = sum(i * o for i, o in shapes.values())
    bias = sum(shapes[m][1] for m in ("q_proj", "k_proj", "v_proj")) if cfg.model_type == "qwen2" else 0
    return weights + bias + 2 * cfg.hidden_size


def lora_param_count(cfg: RealConfig, rank: int, targets: tuple[str, ...], layers: int | None = None) -> int:
    """LoRA parameters (A: r x in, B: out x r) over ``layers`` blocks (default: all of them)."""
    shapes = cfg.linear_shapes()
    per_block = sum(rank * (shapes[m][0] + shapes[m][1]) for m in targets)
    return per_block * (cfg.num_hidden_layers if layers is None else layers)
