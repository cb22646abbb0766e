"""Configuration schemas shared by peers and the coordinator (pydantic v2, importable without torch).

Every model validates at construction and its errors name the field and the allowed values.
The coordinator serves a :class:`RoundSpec` as JSON; peers read the same object from a file or over gRPC.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from swarm.arch import ALL_TARGET_MODULES

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(_Strict):
    """LoRA hyper-parameters, identical on every peer of a round."""

    rank: int = Field(8, description="LoRA rank r (> 0).")
    alpha: float = Field(16.0, description="LoRA alpha; updates are scaled by alpha / rank.")
    dropout: float = Field(0.0, description="Dropout on the LoRA input, in [0, 1). 0 keeps replicas exact.")
    target_modules: tuple[str, ...] = Field(
        DEFAULT_TARGET_MODULES, description=f"Linear modules of each block to adapt; any of {ALL_TARGET_MODULES}."
    )
    init_seed: int = Field(0, description="Seed of the deterministic lora_A initialisation (same on every peer).")

    @field_validator("rank")
    @classmethod
    def _rank_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {v}")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha_positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"lora.alpha must be > 0, got {v}")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {v}")
        return v

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"lora.target_modules must name at least one of {', '.join(ALL_TARGET_MODULES)}")
        unknown = [m for m in v if m not in ALL_TARGET_MODULES]
        if unknown:
            raise ValueError(
                f"lora.target_modules has unknown module(s) {unknown}; allowed values: {', '.join(ALL_TARGET_MODULES)}"
            )
        return tuple(dict.fromkeys(v))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class SpanRange(_Strict):
    """A half-open range of transformer blocks ``[start, end)``."""

    start: int = Field(..., description="First block index (>= 0).")
    end: int = Field(..., description="One past the last block index (> start).")

    @model_validator(mode="after")
    def _ordered(self) -> SpanRange:
        if self.start < 0 or self.end <= self.start:
            raise ValueError(f"span must satisfy 0 <= start < end, got [{self.start}, {self.end})")
        return self

    def check_within(self, num_layers: int) -> None:
        """Raise ``ValueError`` if the span does not fit a model with ``num_layers`` blocks."""
        if self.end > num_layers:
            raise ValueError(
                f"span [{self.start}, {self.end}) is outside the model: blocks must lie in [0, {num_layers})"
            )

    @property
    def name(self) -> str:
        return f"{self.start}-{self.end}"

    def __len__(self) -> int:
        return self.end - self.start


def split_even(num_layers: int, num_spans: int) -> tuple[SpanRange, ...]:
    """Cut ``num_layers`` blocks into ``num_spans`` contiguous spans of (nearly) equal length."""
    if not 1 <= num_spans <= num_layers:
        raise ValueError(f"num_spans must be in [1, {num_layers}], got {num_spans}")
    bounds = [round(i * num_layers / num_spans) for i in range(num_spans + 1)]
    return tuple(SpanRange(start=a, end=b) for a, b in zip(bounds, bounds[1:], strict=False))


class BaseModelRef(_Strict):
    """The base model of a round: where to load it and the fingerprint every peer must match."""

    path: str = Field(..., description="Local checkpoint directory or Hugging Face hub id.")
    fingerprint: str = Field("", description="sha256 fingerprint of config + weights (swarm.checkpoint).")
    model_type: str = Field("llama", description="config.json model_type (llama, mistral, qwen2).")
    num_layers: int = Field(..., description="Number of transformer blocks in the base model.")


class DataSettings(_Strict):
    """Where a trainer reads text and how it is cut into sequences."""

    train_path: str = Field("", description="JSONL ({'text': ...}), .txt or .parquet file or directory of them.")
    eval_path: str = Field("", description="Held-out file in the same formats; empty = split from train_path.")
    seq_len: int = Field(64, description="Tokens per packed sequence (> 1).")
    eval_fraction: float = Field(0.1, description="Fraction held out when eval_path is empty, in (0, 1).")
    micro_batch_size: int = Field(8, description="Sequences per forward/backward call (> 0).")
    seed: int = Field(0, description="Seed of shuffling and of the held-out split.")

    @field_validator("seq_len")
    @classmethod
    def _seq_len(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {v}")
        return v

    @field_validator("micro_batch_size")
    @classmethod
    def _mbs(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"data.micro_batch_size must be > 0, got {v}")
        return v

    @field_validator("eval_fraction")
    @classmethod
    def _frac(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {v}")
        return v


class OptimizerSettings(_Strict):
    """Optimizer applied to LoRA parameters after each collaborative epoch."""

    name: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer: adamw or sgd.")
    lr: float = Field(3e-3, description="Learning rate (> 0).")
    weight_decay: float = Field(0.0, description="Decoupled weight decay (>= 0).")
    target_batch_size: int = Field(32, description="Samples (sequences) summed over the swarm per epoch.")
    matchmaking_time: float = Field(3.0, description="Seconds hivemind waits to form an averaging group.")
    averaging_timeout: float = Field(30.0, description="Seconds before an all-reduce is abandoned.")
    max_microbatch_grad_norm: float = Field(
        0.0,
        description="Span servers clip each micro-batch's LoRA gradient to this L2 norm before it counts (bounds "
        "what one contributor can push; 0 = off, the exact default: a clipped step is no longer centralized PEFT's).",
    )
    average_state_every: int = Field(
        0,
        description="Epochs between averaging LoRA weights + optimizer state across replicas (0 = never). Not "
        "needed for exactness: every replica joins every gradient all-reduce, and after a failed one the replicas "
        "copy one replica's state.",
    )

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"optimizer.lr must be > 0, got {v}")
        return v

    @field_validator("target_batch_size")
    @classmethod
    def _tbs(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"optimizer.target_batch_size must be > 0, got {v}")
        return v


class WireSettings(_Strict):
    """How activations and their gradients travel between spans (hivemind.compression)."""

    compression: Literal["none", "float16", "bfloat16", "uint8"] = Field(
        "none",
        description="none = exact fp32 (default; exactness tests), float16 / bfloat16 = half the bytes, "
        "uint8 = hivemind's uniform 8-bit quantization (a quarter).",
    )


class EndCondition(_Strict):
    """When a round stops training. The first limit reached ends it; at least one must be set."""

    target_samples: int = Field(0, description="End after this many samples swarm-wide (0 = unused).")
    target_epochs: int = Field(0, description="End after this many optimizer epochs (0 = unused).")
    deadline_s: float = Field(0.0, description="End this many seconds after training starts (0 = unused).")

    @model_validator(mode="after")
    def _some_limit(self) -> EndCondition:
        if min(self.target_samples, self.target_epochs, self.deadline_s) < 0:
            raise ValueError("end condition limits must be >= 0")
        if not (self.target_samples or self.target_epochs or self.deadline_s):
            raise ValueError("end condition needs one of target_samples, target_epochs, deadline_s > 0")
        return self


class RoundSpec(_Strict):
    """Everything a peer needs to take part in one training round."""

    round_id: str = Field(..., description="Unique round identifier (letters, digits, '-', '_').")
    base: BaseModelRef
    lora: LoraSettings = LoraSettings()
    spans: tuple[SpanRange, ...] = Field(..., description="Contiguous spans covering [0, base.num_layers).")
    data: DataSettings = DataSettings()
    optimizer: OptimizerSettings = OptimizerSettings()
    wire: WireSettings = WireSettings()
    end: EndCondition = EndCondition(target_epochs=10)
    parent_adapter: str = Field("", description="Version of the adapter this round starts from ('' = fresh LoRA).")

    @field_validator("round_id")
    @classmethod
    def _round_id(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError(f"round_id must be non-empty and use only letters, digits, '-' or '_', got {v!r}")
        return v

    @model_validator(mode="after")
    def _spans_cover_model(self) -> RoundSpec:
        if not self.spans:
            raise ValueError("spans must list at least one span")
        expected = 0
        for span in self.spans:
            if span.start != expected:
                raise ValueError(f"spans must be contiguous from block 0; span {span.name} starts at {span.start}")
            expected = span.end
        if expected != self.base.num_layers:
            raise ValueError(f"spans end at block {expected} but the base model has {self.base.num_layers} blocks")
        if self.optimizer.target_batch_size % self.data.micro_batch_size:
            raise ValueError(
                f"optimizer.target_batch_size ({self.optimizer.target_batch_size}) must be a multiple of "
                f"data.micro_batch_size ({self.data.micro_batch_size}): a step is a whole number of micro-batches"
            )
        return self

    @property
    def target_epochs(self) -> int:
        """Swarm-wide steps the round trains (0 = only a deadline ends it)."""
        end = self.end
        if end.target_samples:
            by_samples = -(-end.target_samples // self.optimizer.target_batch_size)
            return min(by_samples, end.target_epochs) if end.target_epochs else by_samples
        return end.target_epochs

    def span_index(self, span: SpanRange) -> int:
        """Position of ``span`` in :attr:`spans`; ``ValueError`` if the round has no such span."""
        for i, s in enumerate(self.spans):
            if s == span:
                return i
        raise ValueError(f"span {span.name} is not one of this round's spans {[s.name for s in self.spans]}")

    def run_id(self, span: SpanRange) -> str:
        """hivemind ``run_id`` of the optimizer group that trains ``span`` in this round."""
        return f"{self.round_id}_span{span.start}-{span.end}"

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> RoundSpec:
        return cls.model_validate_json(text)

    @classmethod
    def load(cls, path: str | Path) -> RoundSpec:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"round spec file {p} does not exist")
        return cls.model_validate(json.loads(p.read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())
