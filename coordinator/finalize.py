"""Finalizing a round, as functions: is everything in, which replica of each span, assemble, gate on eval.

The rules (the driver in :mod:`coordinator.publish` applies them to a store snapshot):

1. **Epochs.** A span's expected epoch is the highest epoch its members reported in heartbeats; its
   target epoch is the larger of that and the highest epoch uploaded for it. Only uploads at the
   target epoch count; older ones come from lagging replicas and are ignored.
2. **Evals.** Reports on the round's own adapter (``adapter_version == ""``), the latest per peer:
   *before* = epoch 0, reported before training stopped (the loss of the round's starting point);
   *after* = epoch >= 1, reported once the round was finalizing (the loss of the final state).
3. **Ready.** Go as soon as every span has an upload at its target epoch, every live member has
   uploaded for its span, every live peer that reported *before* has reported *after*, and there is
   at least one *after*. When ``finalize_timeout_s`` has passed since training stopped, go with what
   is there if every span has an upload at its target epoch and one *after* exists; else fail
   (``missing_span`` or ``no_eval``).
4. **Replicas.** Uploads of a span at its target epoch agree when they hold the same keys and shapes
   and differ by at most ``atol`` everywhere. Uploads with NaN/Inf are set aside (``nonfinite`` if
   none is left). The largest group of agreeing uploads wins (ties: more samples, then the earliest);
   any outvoted replica is named in a warning stored with the round.
5. **Eval gate.** before / after = ``eval_tokens``-weighted means; fail (``no_eval``) without a
   before or an after report, (``worse_than_parent``) unless after < before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from safetensors.torch import load_file

from coordinator.state import EvalReport, MemberRecord, RoundRecord, SpanStateUpload
from swarm.adapter_tensors import merge_span_states, validate_lora_tensors


class Outcome(str, Enum):
    """How a finalization ended: the metric label and the prefix of a failed round's reason."""

    PUBLISHED = "published"
    MISSING_SPAN = "missing_span"  # a span never got an upload at its target epoch
    NO_EVAL = "no_eval"  # no before or no after eval report
    WORSE_THAN_PARENT = "worse_than_parent"  # eval loss after >= before
    NONFINITE = "nonfinite"  # every upload of a span holds NaN/Inf
    INVALID_STATE = "invalid_state"  # uploads do not assemble into a valid LoRA state for the spec
    INVALID_SPEC = "invalid_spec"  # the round spec cannot describe an adapter (no base fingerprint)
    ERROR = "error"  # an unexpected error persisted until the timeout


class FinalizeError(Exception):
    """Finalization failed with ``outcome``; the message says what was wrong."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(f"{outcome.value}: {message}")
        self.outcome = outcome
        self.message = message


@dataclass(frozen=True)
class Collected:
    """What a finalizing round has received, sorted by the rules above."""

    targets: dict[int, int]  # span index -> target epoch
    uploads: dict[int, list[SpanStateUpload]]  # span index -> uploads at the target epoch
    before: list[EvalReport]
    after: list[EvalReport]
    missing_spans: list[str]  # spans without an upload at the target epoch
    waiting_for: list[str] = field(default_factory=list)  # what a complete finalization still lacks

    @property
    def minimal(self) -> bool:
        return not self.missing_spans and bool(self.after)

    @property
    def complete(self) -> bool:
        return self.minimal and not self.waiting_for


def _latest_per_peer(reports: Iterable[EvalReport]) -> list[EvalReport]:
    latest: dict[str, EvalReport] = {}
    for r in reports:
        latest.pop(r.peer_id, None)
        latest[r.peer_id] = r
    return list(latest.values())


def collect(
    record: RoundRecord, members: list[MemberRecord], uploads: list[SpanStateUpload], reports: list[EvalReport]
) -> Collected:
    """Sort a finalizing round's uploads and eval reports (rules 1-3)."""
    spans = record.spec.spans
    ended = record.ended_at if record.ended_at is not None else float("inf")
    targets: dict[int, int] = {}
    chosen: dict[int, list[SpanStateUpload]] = {}
    missing = []
    for i, span in enumerate(spans):
        expected = max((m.epoch for m in members if m.span_index == i), default=0)
        mine = [u for u in uploads if u.span_index == i]
        targets[i] = max([expected, *(u.epoch for u in mine)])
        chosen[i] = [u for u in mine if u.epoch == targets[i]]
        if not chosen[i]:
            missing.append(f"span {span.name} (epoch {targets[i]})")
    own = [r for r in reports if not r.adapter_version]
    before = _latest_per_peer(r for r in own if r.epoch == 0 and r.reported_at < ended)
    after = _latest_per_peer(r for r in own if r.epoch >= 1 and r.reported_at >= ended)
    waiting = list(missing)
    live = [m for m in members if m.live]
    uploaded = {(u.peer_id, u.span_index) for u in uploads}
    waiting += [f"upload from {m.peer_id}" for m in live if (m.peer_id, m.span_index) not in uploaded]
    reported = {r.peer_id for r in after}
    live_ids = {m.peer_id for m in live}
    waiting += [f"final eval from {r.peer_id}" for r in before if r.peer_id in live_ids and r.peer_id not in reported]
    if not after:
        waiting.append("a final eval report (ReportEval with epoch >= 1)")
    return Collected(targets, chosen, before, after, missing, waiting)


def decide(collected: Collected, elapsed_s: float, timeout_s: float) -> bool:
    """True to finalize now, False to wait; :class:`FinalizeError` once the timeout leaves too little."""
    if collected.complete:
        return True
    if elapsed_s < timeout_s:
        return False
    if collected.missing_spans:
        raise FinalizeError(
            Outcome.MISSING_SPAN,
            f"no upload after {timeout_s:g} s for {', '.join(collected.missing_spans)}: "
            "every span needs a peer that uploads its state",
        )
    if not collected.after:
        raise FinalizeError(Outcome.NO_EVAL, f"no final eval report (ReportEval epoch >= 1) after {timeout_s:g} s")
    return True


def weighted_loss(reports: list[EvalReport]) -> float | None:
    """``eval_tokens``-weighted mean loss (None without reports)."""
    tokens = sum(r.eval_tokens for r in reports)
    return sum(r.eval_loss * r.eval_tokens for r in reports) / tokens if tokens else None


def gate(collected: Collected) -> tuple[float, float]:
    """``(loss_before, loss_after)`` if the new state is better than its starting point (rule 5)."""
    before, after = weighted_loss(collected.before), weighted_loss(collected.after)
    if before is None:
        raise FinalizeError(Outcome.NO_EVAL, "no trainer reported the starting eval loss (ReportEval epoch 0)")
    if after is None:
        raise FinalizeError(Outcome.NO_EVAL, "no trainer reported the final eval loss (ReportEval epoch >= 1)")
    if not after < before:
        raise FinalizeError(
            Outcome.WORSE_THAN_PARENT,
            f"eval loss after training {after:.6g} is not below the starting point's {before:.6g} "
            f"({len(collected.after)} and {len(collected.before)} report(s)): not published",
        )
    return before, after


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over all tensors; ``inf`` if keys or shapes differ."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def choose_replica(
    span: str, candidates: list[tuple[SpanStateUpload, dict[str, torch.Tensor]]], atol: float
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state most replicas agree on (rule 4) and warnings naming set-aside replicas."""
    warnings = []
    finite = []
    for upload, state in candidates:
        if all(bool(torch.isfinite(t).all()) for t in state.values()):
            finite.append((upload, state))
        else:
            warnings.append(f"span {span}: {upload.peer_id}'s upload holds NaN/Inf, set aside")
    if not finite:
        peers = ", ".join(u.peer_id for u, _ in candidates)
        raise FinalizeError(Outcome.NONFINITE, f"span {span}: every upload holds NaN/Inf values (from {peers})")
    groups: list[list[tuple[SpanStateUpload, dict[str, torch.Tensor]]]] = []
    for item in finite:
        group = next((g for g in groups if max_abs_diff(g[0][1], item[1]) <= atol), None)
        if group is None:
            groups.append([item])
        else:
            group.append(item)
    best = max(groups, key=lambda g: (len(g), sum(u.samples for u, _ in g)))  # max keeps the first of equals
    for g in groups:
        if g is not best:
            diff = max_abs_diff(best[0][1], g[0][1])
            warnings.append(
                f"span {span}: replicas disagree (max |diff| {diff:.3g} > {atol:g}); kept "
                f"{', '.join(u.peer_id for u, _ in best)}, outvoted {', '.join(u.peer_id for u, _ in g)}"
            )
    return best[0][1], warnings


def load_upload(blob_dir: Path, upload: SpanStateUpload) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(blob_dir / upload.path))
    except Exception as e:  # unreadable upload: name it
        raise FinalizeError(
            Outcome.INVALID_STATE, f"cannot read {upload.peer_id}'s upload of span {upload.span_index}: {e}"
        ) from e


def assemble(
    record: RoundRecord, collected: Collected, blob_dir: Path, atol: float
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One full LoRA state from the chosen replica of every span, checked against the round's LoRA settings."""
    spec = record.spec
    pieces, warnings = [], []
    for i, span in enumerate(spec.spans):
        candidates = [(u, load_upload(blob_dir, u)) for u in collected.uploads[i]]
        state, notes = choose_replica(span.name, candidates, atol)
        pieces.append(state)
        warnings += notes
    try:
        merged = merge_span_states(pieces, spec.spans)
        validate_lora_tensors(merged, spec.lora)
    except ValueError as e:
        raise FinalizeError(Outcome.INVALID_STATE, f"span states do not form the round's adapter: {e}") from e
    return merged, warnings
