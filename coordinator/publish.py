"""The finalization driver: from a finalizing round to a signed, registered adapter and the next round.

:func:`finalize_step` is one pass (the :class:`~coordinator.periodic.Periodic` thread of the server
calls it every ``finalize_poll_s``; tests call it directly). Store reads and writes happen under the
coordinator lock; loading uploads and writing the adapter happen outside it, so RPCs keep flowing.

Crash safety: the adapter directory appears atomically (``write_adapter``), then it is registered,
then the round is marked published, then the next round opens. A restart resumes from any point:
a registered adapter of a finalizing round is published without redoing the work, and an unregistered
directory that verifies and names the round is registered instead of computing a new version.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load_file, save

from coordinator import eval_gate
from coordinator.blobs import write_atomic
from coordinator.context import CoordinatorContext
from coordinator.finalize import Collected, FinalizeError, Outcome, assemble, collect, decide
from coordinator.lifecycle import RoundEvent
from coordinator.retention import prune
from coordinator.rounds import RoundConflict, apply_event, open_round
from coordinator.state import AdapterRecord, Candidate, MemberState, RoundRecord
from swarm.adapter import (
    AdapterInfo,
    AdapterVerificationError,
    Contributor,
    Manifest,
    read_manifest,
    verify_adapter,
    write_adapter,
)
from swarm.proto import RoundState

log = logging.getLogger(__name__)
_VERSION = re.compile(r"^v(\d+)$")


def next_version(ctx: CoordinatorContext) -> str:
    """``v<N+1>`` past every registered version and every directory under the adapters dir."""
    names = {a.version for a in ctx.store.list_adapters()}
    adapters_dir = ctx.config.adapters_dir
    if adapters_dir.is_dir():
        names |= {p.name for p in adapters_dir.iterdir()}
    numbers = [int(m[1]) for n in names if (m := _VERSION.match(n))]
    return f"v{max(numbers, default=0) + 1}"


def round_adapter(ctx: CoordinatorContext, round_id: str) -> AdapterRecord | None:
    """The adapter a round published (None if it has not)."""
    return next((a for a in ctx.store.list_adapters() if a.round_id == round_id), None)


def _orphan(ctx: CoordinatorContext, record: RoundRecord, key: Ed25519PrivateKey) -> tuple[Path, Manifest] | None:
    """An unregistered adapter directory of this round left by a crash between writing and registering."""
    adapters_dir = ctx.config.adapters_dir
    registered = {a.version for a in ctx.store.list_adapters()}
    for d in sorted(adapters_dir.iterdir()) if adapters_dir.is_dir() else []:
        if d.name in registered or not _VERSION.match(d.name) or not d.is_dir():
            continue
        try:
            if read_manifest(d).round_id != record.round_id:  # cheap check first: no hashing
                continue
            manifest = verify_adapter(d, key.public_key())
        except AdapterVerificationError:
            continue
        if manifest.version == d.name:
            return d, manifest
    return None


def series_rounds(ctx: CoordinatorContext) -> list[RoundRecord]:
    """Rounds of the configured series: ``<base>`` then ``<base>-r2``, ``<base>-r3``..."""
    spec = ctx.config.round_spec
    if spec is None:
        return []
    pattern = re.compile(rf"^{re.escape(spec.round_id)}(-r\d+)?$")
    return [r for r in ctx.store.list_rounds() if pattern.match(r.round_id)]


def continue_series(ctx: CoordinatorContext, now: float) -> RoundRecord | None:
    """Open the configured round, or the series' next one, when no round is active and rounds remain.

    The next round repeats the last round's spec with id ``<base>-r<N>`` and starts from the adapter
    the last round published (a failed round's successor retries from the failed round's parent).
    Call with the lock held.
    """
    spec = ctx.config.round_spec
    if spec is None or ctx.store.active_round() is not None:
        return None
    series = series_rounds(ctx)
    if series and ctx.config.rounds and len(series) >= ctx.config.rounds:
        return None
    nxt = spec
    if series:
        last = series[-1]
        published = round_adapter(ctx, last.round_id) if last.state is RoundState.PUBLISHED else None
        parent = published.version if published else last.parent_adapter
        nxt = last.spec.model_copy(update={"round_id": f"{spec.round_id}-r{len(series) + 1}", "parent_adapter": parent})
    try:
        return open_round(ctx.store, nxt, now)
    except RoundConflict as e:
        log.warning("not opening round %s: %s", nxt.round_id, e)
        return None


def _fail(ctx: CoordinatorContext, record: RoundRecord, error: FinalizeError, now: float) -> Outcome:
    apply_event(ctx.store, record, RoundEvent.FAIL, now, str(error))
    ctx.metrics.finalize.labels(outcome=error.outcome.value).inc()
    log.warning("round %s failed to finalize: %s", record.round_id, error)
    prune(ctx)
    continue_series(ctx, now)
    return error.outcome


def _publish(ctx: CoordinatorContext, record: RoundRecord, path: Path, manifest: Manifest, notes: list[str],
             now: float) -> Outcome:  # fmt: skip
    ctx.store.add_adapter(AdapterRecord(manifest.version, manifest.parents, record.round_id, str(path),
                                        manifest.weights_sha256, now, manifest.eval_loss_before,
                                        manifest.eval_loss_after))  # fmt: skip
    return _mark_published(ctx, record, manifest.version, notes, now)


def _mark_published(
    ctx: CoordinatorContext, record: RoundRecord, version: str, notes: list[str], now: float
) -> Outcome:
    ctx.metrics.finalize.labels(outcome=Outcome.PUBLISHED.value).inc()
    ctx.metrics.replica_disagreements.inc(sum("disagree" in n for n in notes))
    apply_event(ctx.store, record, RoundEvent.PUBLISH, now, "; ".join([f"published {version}", *notes]))
    for note in notes:
        log.warning("round %s: %s", record.round_id, note)
    prune(ctx)
    continue_series(ctx, now)
    return Outcome.PUBLISHED


@dataclass(frozen=True)
class _Assemble:
    """Every span is in: assemble the candidate (outside the lock) and pick its evaluators."""

    record: RoundRecord
    collected: Collected


@dataclass(frozen=True)
class _Job:
    """The evaluators passed the candidate: write, sign and register it."""

    record: RoundRecord
    info: AdapterInfo
    target: Path
    candidate: Candidate


def _prepare(ctx: CoordinatorContext, key: Ed25519PrivateKey) -> _Assemble | _Job | Outcome | None:
    """Under the lock: decide, and either finish now (fail, resume) or describe the next piece of work."""
    store, now = ctx.store, ctx.clock()
    record = store.active_round()
    if record is None or record.state is not RoundState.FINALIZING:
        return None
    done = round_adapter(ctx, record.round_id)
    if done is not None:  # registered before a crash: only the state change is missing
        return _mark_published(ctx, record, done.version, ["resumed after a restart"], now)
    orphan = _orphan(ctx, record, key)
    if orphan is not None:
        return _publish(ctx, record, *orphan, ["resumed after a restart"], now)
    everyone = store.list_members(record.round_id)
    expelled = {m.peer_id for m in everyone if m.state is MemberState.EXPELLED}  # nothing of theirs is used
    spec, members = record.spec, [m for m in everyone if m.peer_id not in expelled]
    elapsed, timeout = now - (record.ended_at or now), ctx.config.finalize_timeout_s
    candidate = ctx.candidates.get(record.round_id)
    try:
        if not spec.base.fingerprint:
            raise FinalizeError(Outcome.INVALID_SPEC, "the round spec has no base.fingerprint to put in the manifest")
        if candidate is None:
            uploads = [u for u in store.list_span_states(record.round_id) if u.peer_id not in expelled]
            collected = collect(record, members, uploads)
            if not decide(collected, elapsed, timeout):
                log.debug("round %s finalizing, waiting for: %s", record.round_id, "; ".join(collected.waiting_for))
                return None
            return _Assemble(record, collected)
        tally = eval_gate.tally(record, members, store.list_eval_reports(record.round_id), candidate.sha256,
                                candidate.evaluators, operator=bool(ctx.config.evaluator_ids))  # fmt: skip
        if not eval_gate.decide(tally, elapsed, timeout):
            log.debug("round %s finalizing, waiting for: %s", record.round_id, "; ".join(tally.waiting_for))
            return None
        before, after = eval_gate.gate(tally)
    except FinalizeError as e:
        return _fail(ctx, record, e, now)
    version = next_version(ctx)
    contributors = tuple(Contributor(peer_id=c.peer_id, samples=c.samples, tokens=c.tokens)
                         for c in store.list_contributions(record.round_id) if c.peer_id not in expelled)  # fmt: skip
    info = AdapterInfo(version=version, parent_version=record.parent_adapter or None, round_id=record.round_id,
                       base_model=spec.base.path, base_fingerprint=spec.base.fingerprint, contributors=contributors,
                       base_quantization=tuple(sorted({m.capacity.quantize or "unrecorded" for m in members})),
                       eval_loss_before=before, eval_loss_after=after, method="round")  # fmt: skip
    return _Job(record, info, ctx.config.adapters_dir / version, candidate)


def _still_finalizing(ctx: CoordinatorContext, round_id: str) -> RoundRecord | None:
    current = ctx.store.get_round(round_id)
    return current if current is not None and current.state is RoundState.FINALIZING else None


def _failed(ctx: CoordinatorContext, record: RoundRecord, e: Exception) -> Outcome | None:
    """A FinalizeError fails the round; another error (e.g. a full disk) is retried until the timeout."""
    now = ctx.clock()
    if not isinstance(e, FinalizeError):
        if now - (record.ended_at or now) < ctx.config.finalize_timeout_s:
            log.exception("finalizing round %s failed; retrying", record.round_id)
            return None
        e = FinalizeError(Outcome.ERROR, f"{type(e).__name__}: {e}")
    with ctx.lock:
        current = _still_finalizing(ctx, record.round_id)
        return _fail(ctx, current, e, now) if current else None


def _build_candidate(ctx: CoordinatorContext, job: _Assemble) -> None:
    """Assemble the candidate, keep its bytes, name it by sha256 and pick its evaluators (rule 4)."""
    record = job.record
    tensors, notes = assemble(record, job.collected, ctx.config.blob_dir, ctx.config.replica_atol)
    data = save(tensors)
    relpath = f"{record.round_id}/candidate.safetensors"
    sha256 = write_atomic(ctx.config.blob_dir / relpath, data)
    with ctx.lock:
        current = _still_finalizing(ctx, record.round_id)
        if current is None:
            return
        reports = ctx.store.list_eval_reports(record.round_id)
        evaluators = ctx.config.evaluator_ids or eval_gate.pick_evaluators(current, reports, ctx.config.eval_quorum)
        ctx.candidates[record.round_id] = Candidate(record.round_id, sha256, str(ctx.config.blob_dir / relpath),
                                                    evaluators, tuple(notes))  # fmt: skip
    log.info("round %s: candidate %s assembled; evaluators %s", record.round_id, sha256[:12],
             ", ".join(evaluators) or "(none)")  # fmt: skip


def finalize_step(ctx: CoordinatorContext, key: Ed25519PrivateKey) -> Outcome | None:
    """One finalization pass over the active round; the outcome when it ended the round, else None."""
    with ctx.lock:
        job = _prepare(ctx, key)
    if isinstance(job, _Assemble):
        try:
            _build_candidate(ctx, job)
        except Exception as e:
            return _failed(ctx, job.record, e)
        return None
    if not isinstance(job, _Job):
        return job
    record = job.record
    try:
        tensors = load_file(job.candidate.path)
        manifest = write_adapter(job.target, tensors, record.spec.lora, job.info, key)
    except Exception as e:
        return _failed(ctx, record, e)
    with ctx.lock:
        current = _still_finalizing(ctx, record.round_id)
        if current is None:
            shutil.rmtree(job.target, ignore_errors=True)  # the round ended meanwhile: nobody refers to it
            return None
        outcome = _publish(ctx, current, job.target, manifest, list(job.candidate.warnings), ctx.clock())
    log.info("round %s published adapter %s (eval loss %.4f -> %.4f)", record.round_id, manifest.version,
             manifest.eval_loss_before, manifest.eval_loss_after)  # fmt: skip
    return outcome
