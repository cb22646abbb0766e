"""LoRA tensors in PEFT's saved key format: names, validation, and cutting/assembling by block span.

PEFT saves the weights of a causal-LM LoRA adapter under keys such as
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (shape ``[r, in_features]``) and
``...q_proj.lora_B.weight`` (shape ``[out_features, r]``). Every tensor of a published adapter uses
exactly this form, so ``PeftModel.from_pretrained`` loads it as is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from swarm.config import LoraSettings, SpanRange

#: Which submodule of a decoder block holds each targetable linear (llama, mistral, qwen2).
MODULE_PARENT: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

PEFT_KEY_PREFIX = "base_model.model.model.layers."
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<block>\d+)\.(?P<parent>self_attn|mlp)\."
    r"(?P<module>[a-z_]+)\.lora_(?P<which>[AB])\.weight$"
)
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def lora_key(block: int, module: str, which: str) -> str:
    """PEFT saved-state key of the ``lora_A``/``lora_B`` weight (``which`` = 'A' or 'B') of a module."""
    if module not in MODULE_PARENT:
        raise ValueError(f"unknown LoRA target module {module!r}; allowed values: {', '.join(MODULE_PARENT)}")
    if which not in ("A", "B"):
        raise ValueError(f"which must be 'A' or 'B', got {which!r}")
    if block < 0:
        raise ValueError(f"block index must be >= 0, got {block}")
    return f"{PEFT_KEY_PREFIX}{block}.{MODULE_PARENT[module]}.{module}.lora_{which}.weight"


def parse_lora_key(key: str) -> tuple[int, str, str]:
    """``(block, module, which)`` of a PEFT LoRA key; ``ValueError`` if ``key`` is not in that form."""
    m = _KEY.match(key)
    if m is None:
        raise ValueError(
            f"tensor key {key!r} is not a PEFT LoRA key like '{PEFT_KEY_PREFIX}<block>.self_attn.q_proj.lora_A.weight'"
        )
    module = m["module"]
    if MODULE_PARENT.get(module) != m["parent"]:
        raise ValueError(f"tensor key {key!r}: module {module!r} does not live under {m['parent']!r}")
    return int(m["block"]), module, m["which"]


def block_index_of(key: str) -> int:
    """Index of the transformer block a state key belongs to (the number after ``layers.``)."""
    m = _BLOCK.search(key)
    if m is None:
        raise ValueError(f"tensor key {key!r} does not name a transformer block ('layers.<index>.')")
    return int(m.group(1))


def validate_lora_tensors(tensors: Mapping[str, torch.Tensor], lora: LoraSettings) -> None:
    """Check that ``tensors`` is a well-formed LoRA state for ``lora``; ``ValueError`` names the bad tensor.

    Checks: PEFT key names, target modules, floating dtype, 2-D shapes with rank ``lora.rank``, paired
    A/B with matching ranks, every target module present in every adapted block, all values finite.
    """
    if not tensors:
        raise ValueError("adapter has no tensors")
    modules_by_block: dict[int, set[str]] = {}
    for key, t in tensors.items():
        block, module, which = parse_lora_key(key)
        if module not in lora.target_modules:
            raise ValueError(f"tensor {key!r} adapts {module!r}, which is not in target_modules {lora.target_modules}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensor {key!r} is a {type(t).__name__}, expected a torch.Tensor")
        if not t.is_floating_point():
            raise ValueError(f"tensor {key!r} has dtype {t.dtype}; LoRA weights must be floating point")
        if t.dim() != 2:
            raise ValueError(f"tensor {key!r} has shape {tuple(t.shape)}; LoRA weights must be 2-D")
        rank_dim = t.shape[0] if which == "A" else t.shape[1]
        if rank_dim != lora.rank:
            expected = "[r, in_features]" if which == "A" else "[out_features, r]"
            raise ValueError(f"tensor {key!r} has shape {tuple(t.shape)}; expected {expected} with r = {lora.rank}")
        other = key[: -len("A.weight")] + ("B" if which == "A" else "A") + ".weight"
        if other not in tensors:
            raise ValueError(f"tensor {key!r} has no matching {other!r}")
        if not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"tensor {key!r} contains {n_bad} NaN/Inf value(s); refusing to write or load it")
        modules_by_block.setdefault(block, set()).add(module)
    for block, modules in sorted(modules_by_block.items()):
        missing = sorted(set(lora.target_modules) - modules)
        if missing:
            raise ValueError(f"block {block} has LoRA tensors but none for target module(s) {missing}")


def _check_spans(spans: Sequence[SpanRange]) -> None:
    ordered = sorted(spans, key=lambda s: s.start)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.start < a.end:
            raise ValueError(f"spans {a.name} and {b.name} overlap")


def split_by_span(tensors: Mapping[str, torch.Tensor], spans: Sequence[SpanRange]) -> list[dict[str, torch.Tensor]]:
    """Cut a full state into one dict per span (same order as ``spans``), by the block of each key.

    Raises ``ValueError`` if spans overlap or a key's block lies in no span.
    """
    _check_spans(spans)
    pieces: list[dict[str, torch.Tensor]] = [{} for _ in spans]
    for key, t in tensors.items():
        block = block_index_of(key)
        for i, span in enumerate(spans):
            if span.start <= block < span.end:
                pieces[i][key] = t
                break
        else:
            raise ValueError(
                f"tensor {key!r} is in block {block}, which none of the spans {[s.name for s in spans]} covers"
            )
    return pieces


def merge_span_states(
    states: Sequence[Mapping[str, torch.Tensor] | None], spans: Sequence[SpanRange] | None = None
) -> dict[str, torch.Tensor]:
    """Assemble span pieces into one full state.

    Raises ``ValueError`` if a piece is missing (``None`` or empty), two pieces share a key, or, when
    ``spans`` is given (one per piece), a piece holds a key outside its span or lacks a block of it.
    """
    if spans is not None:
        if len(spans) != len(states):
            raise ValueError(f"got {len(states)} span states for {len(spans)} spans")
        _check_spans(spans)
    names = [s.name for s in spans] if spans is not None else [f"#{i}" for i in range(len(states))]
    merged: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for i, state in enumerate(states):
        if not state:
            raise ValueError(f"span {names[i]} has no state: the adapter would be missing those blocks")
        blocks = set()
        for key, t in state.items():
            block = block_index_of(key)
            blocks.add(block)
            if spans is not None and not spans[i].start <= block < spans[i].end:
                raise ValueError(f"span {names[i]} holds tensor {key!r} of block {block}, outside the span")
            if key in merged:
                raise ValueError(f"tensor {key!r} is in both span {owner[key]} and span {names[i]}")
            merged[key] = t
            owner[key] = names[i]
        if spans is not None:
            missing = sorted(set(range(spans[i].start, spans[i].end)) - blocks)
            if missing:
                raise ValueError(f"span {names[i]} has no tensors for block(s) {missing}")
    return merged
