"""Finalizing a round, as functions: is everything in, which replica of each span, assemble.

The rules (the driver in :mod:`coordinator.publish` applies them to a store snapshot; the eval gate
that follows is in :mod:`coordinator.eval_gate`). Every upload comes from the member the coordinator
assigned to that span, authenticated by its credential (:mod:`coordinator.handlers_data`).

1. **Epochs.** A span's expected epoch is the lower median of the epochs its members reported in
   heartbeats (live members; all members if none is live): one member claiming a huge epoch does not
   move it. Each uploaded epoch gets one vote per distinct member that uploaded at it; the target epoch
   is the one with the most votes, ties going to the epoch nearest the expected one, then the lower.
   Only uploads at the target epoch count; the others are lagging (or lying) replicas.
2. **Ready.** Go as soon as every span has an upload at its target epoch and every live member has
   uploaded for its span. When ``finalize_timeout_s`` has passed since training stopped, go with what
   is there if every span has an upload at its target epoch; else fail (``missing_span``).
3. **Replicas.** Uploads of a span at its target epoch agree when they hold the same keys and shapes
   and differ by at most ``atol`` everywhere. Uploads with NaN/Inf are set aside (``nonfinite`` if
   none is left). The largest group of agreeing uploads wins, one vote per member (ties: the group
   uploaded first; self-reported sample counts never decide); any outvoted replica is named in a
   warning stored with the round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from safetensors.torch import load_file

from coordinator.lifecycle import lower_median
from coordinator.state import MemberRecord, RoundRecord, SpanStateUpload
from swarm.adapter_tensors import merge_span_states, validate_lora_tensors
from swarm.proto import NO_SPAN


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
    missing_spans: list[str]  # spans without an upload at the target epoch
    waiting_for: list[str] = field(default_factory=list)  # what a complete finalization still lacks

    @property
    def minimal(self) -> bool:
        return not self.missing_spans

    @property
    def complete(self) -> bool:
        return self.minimal and not self.waiting_for


def expected_epoch(members: list[MemberRecord], span_index: int) -> int:
    """Lower median of the span's members' heartbeat epochs (live ones; every one if none is live)."""
    mine = [m for m in members if m.span_index == span_index]
    live = [m for m in mine if m.live]
    return lower_median(m.epoch for m in (live or mine))


def target_epoch(uploads: list[SpanStateUpload], expected: int) -> int:
    """The uploaded epoch with most distinct uploaders (rule 1); ``expected`` when nothing was uploaded."""
    votes: dict[int, set[str]] = {}
    for u in uploads:
        votes.setdefault(u.epoch, set()).add(u.peer_id)
    if not votes:
        return expected
    return max(votes, key=lambda e: (len(votes[e]), -abs(e - expected), -e))


def collect(record: RoundRecord, members: list[MemberRecord], uploads: list[SpanStateUpload]) -> Collected:
    """Sort a finalizing round's uploads (rules 1-2)."""
    spans = record.spec.spans
    targets: dict[int, int] = {}
    chosen: dict[int, list[SpanStateUpload]] = {}
    missing = []
    for i, span in enumerate(spans):
        mine = [u for u in uploads if u.span_index == i]
        targets[i] = target_epoch(mine, expected_epoch(members, i))
        chosen[i] = [u for u in mine if u.epoch == targets[i]]
        if not chosen[i]:
            missing.append(f"span {span.name} (epoch {targets[i]})")
    waiting = list(missing)
    uploaded = {(u.peer_id, u.span_index) for u in uploads}
    waiting += [
        f"upload from {m.peer_id}"
        for m in members
        if m.live and m.span_index != NO_SPAN and (m.peer_id, m.span_index) not in uploaded
    ]
    return Collected(targets, chosen, missing, waiting)


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
    return True


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
    best = max(groups, key=lambda g: len({u.peer_id for u, _ in g}))  # max keeps the first of equals
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
