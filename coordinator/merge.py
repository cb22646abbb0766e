"""Merging published LoRA adapters: pure tensor functions, plus writing the result as a signed adapter.

PEFT's ``LoraModel.add_weighted_adapter`` is the reference; the two methods mirror two of its
combination types exactly:

- ``"linear"`` mirrors PEFT's ``"cat"``: ``A = cat_i(w_i * s_i * A_i)`` along the rank axis,
  ``B = cat_i(B_i)`` along the rank axis, rank ``sum(r_i)``, ``alpha = rank`` (scaling 1). Then
  ``B @ A = sum_i w_i * s_i * B_i @ A_i``: the exact weighted sum of the adapters' updates. (PEFT's own
  ``"linear"`` sums ``sqrt(w s) A_i`` and ``sqrt(w s) B_i`` separately, which adds cross terms
  ``B_i A_j``; it is not offered.) Ranks may differ.
- ``"ties"`` mirrors PEFT's ``"ties_svd"``: on each module's update ``delta_i = s_i * B_i @ A_i``:
  trim each to its ``density`` fraction of largest magnitudes, elect the sign per entry (sign of the
  sum of the trimmed deltas, ``>= 0`` is +), keep the weighted entries that agree with it and average
  them over their count (disjoint merge), then re-factorize with a truncated SVD to rank
  ``max(r_i)`` (``B = U S``, ``A = Vh``), ``alpha = rank``. Exact when the merged update has rank
  ``<= max(r_i)``; otherwise the best rank-r approximation.

``s_i = alpha_i / r_i`` is each adapter's LoRA scaling. Every input must adapt the same modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm.adapter import AdapterInfo, Contributor, Manifest, load_adapter_tensors, write_adapter
from swarm.config import LoraSettings

MergeMethod = Literal["linear", "ties"]
MERGE_METHODS: tuple[str, ...] = ("linear", "ties")
_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class MergedLora:
    """A merged state in PEFT keys, with the rank and alpha its ``adapter_config.json`` must state."""

    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float


def _modules(state: Mapping[str, torch.Tensor], index: int) -> list[str]:
    modules = sorted(k[: -len(_A)] for k in state if k.endswith(_A))
    for key in state:
        if not key.endswith((_A, _B)):
            raise ValueError(f"adapter #{index}: tensor {key!r} is not a LoRA A/B weight")
    for m in modules:
        if m + _B not in state:
            raise ValueError(f"adapter #{index}: {m + _A!r} has no matching {m + _B!r}")
    if len(modules) * 2 != len(state):
        raise ValueError(f"adapter #{index} has lora_B weights without lora_A")
    return modules


def _check_inputs(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                  scalings: Sequence[float]) -> list[str]:  # fmt: skip
    if len(states) < 2:
        raise ValueError(f"merging needs at least 2 adapters, got {len(states)}")
    if not len(weights) == len(scalings) == len(states):
        raise ValueError(f"got {len(states)} adapters, {len(weights)} weights and {len(scalings)} scalings")
    for name, values in (("weights", weights), ("scalings", scalings)):
        if not all(math.isfinite(float(v)) for v in values):
            raise ValueError(f"{name} must be finite numbers, got {list(values)}")
    modules = _modules(states[0], 0)
    for i, state in enumerate(states[1:], start=1):
        other = _modules(state, i)
        if other != modules:
            diff = sorted(set(modules) ^ set(other))
            raise ValueError(f"adapter #{i} adapts other modules than adapter #0 (differ at {diff[:3]})")
    for m in modules:
        shapes = {(tuple(s[m + _A].shape)[1], tuple(s[m + _B].shape)[0]) for s in states}
        if len(shapes) != 1:
            raise ValueError(f"module {m!r} has different (in, out) features across adapters: {sorted(shapes)}")
    return modules


def _rank(state: Mapping[str, torch.Tensor], module: str) -> int:
    return int(state[module + _A].shape[0])


def _cat(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], scalings: Sequence[float],
         modules: list[str]) -> MergedLora:  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        out[m + _A] = torch.cat(
            [s[m + _A].float() * (w * k) for s, w, k in zip(states, weights, scalings, strict=True)]
        )
        out[m + _B] = torch.cat([s[m + _B].float() for s in states], dim=1)
    rank = sum(_rank(s, modules[0]) for s in states)
    return MergedLora(out, rank, float(rank))


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (PEFT's rule)."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=int(density * flat.numel())).indices] = 1
    return delta * mask.reshape(delta.shape)


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
         majority_sign_method: Literal["total", "frequency"] = "total") -> torch.Tensor:  # fmt: skip
    """TIES-merge of full updates: trim to ``density``, elect sign, disjoint weighted mean."""
    trimmed = torch.stack([magnitude_prune(d, density) for d in deltas])
    votes = trimmed.sum(dim=0) if majority_sign_method == "total" else trimmed.sign().sum(dim=0)
    majority = torch.where(votes >= 0, 1.0, -1.0)
    agree = trimmed.sign() == majority
    w = torch.tensor([float(x) for x in weights], dtype=trimmed.dtype).view(-1, *([1] * (trimmed.dim() - 1)))
    kept = (trimmed * w * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1)


def refactorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of rank ``rank`` with ``B @ A`` the best rank-``rank`` approximation of ``delta``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b, a = u[:, :rank] * s[:rank], vh[:rank, :]
    if a.shape[0] < rank:  # delta is smaller than the rank: pad with zero directions
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return a.contiguous(), b.contiguous()


def merge_adapters(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    method: MergeMethod,
    *,
    scalings: Sequence[float],
    density: float = 0.5,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> MergedLora:
    """Merge LoRA states (PEFT keys) with ``weights``; see the module docstring for each method."""
    modules = _check_inputs(states, weights, scalings)
    if method == "linear":
        return _cat(states, weights, scalings, modules)
    if method != "ties":
        raise ValueError(f"unknown merge method {method!r}; allowed values: {', '.join(MERGE_METHODS)}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    rank = max(_rank(s, modules[0]) for s in states)
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        deltas = [s[m + _B].double() @ s[m + _A].double() * k for s, k in zip(states, scalings, strict=True)]
        a, b = refactorize(ties(deltas, weights, density, majority_sign_method), rank)
        out[m + _A], out[m + _B] = a.float(), b.float()
    return MergedLora(out, rank, float(rank))


def merge_adapter_dirs(
    directories: Sequence[str | Path],
    weights: Sequence[float],
    method: MergeMethod,
    out: str | Path,
    *,
    signing_key: Ed25519PrivateKey,
    public_key: Ed25519PublicKey,
    version: str = "",
    density: float = 0.5,
) -> Manifest:
    """Verify each adapter with ``public_key``, merge them, and write a new signed adapter at ``out``.

    The result lists every input version in ``parents`` (no single ``parent_version``), sums their
    contributors, and has method ``merge-<method>``. ``ValueError`` if the inputs were trained on
    different base models or adapt different modules (and as :func:`merge_adapters` raises).
    """
    loaded = [load_adapter_tensors(d, public_key) for d in directories]
    manifests = [m for m, _ in loaded]
    first = manifests[0]
    for m in manifests[1:]:
        if m.base_fingerprint != first.base_fingerprint:
            raise ValueError(
                f"adapters {first.version} and {m.version} were trained on different base models "
                f"({first.base_fingerprint} vs {m.base_fingerprint}): they cannot be merged"
            )
    scalings = [m.lora.alpha / m.lora.rank for m in manifests]
    merged = merge_adapters([t for _, t in loaded], weights, method, scalings=scalings, density=density)
    totals: dict[str, tuple[int, int]] = {}
    for m in manifests:
        for c in m.contributors:
            samples, tokens = totals.get(c.peer_id, (0, 0))
            totals[c.peer_id] = (samples + c.samples, tokens + c.tokens)
    name = version or "-".join([*(m.version for m in manifests), method])
    lora = LoraSettings(rank=merged.rank, alpha=merged.alpha, dropout=first.lora.dropout,
                        target_modules=first.lora.target_modules)  # fmt: skip
    info = AdapterInfo(
        version=name,
        round_id=f"merge-{name}",
        base_model=first.base_model,
        base_fingerprint=first.base_fingerprint,
        contributors=tuple(Contributor(peer_id=p, samples=s, tokens=t) for p, (s, t) in sorted(totals.items())),
        method=f"merge-{method}",
        parents=tuple(m.version for m in manifests),
    )
    return write_adapter(out, merged.tensors, lora, info, signing_key)
