"""The coordinator's status page: ``/`` (HTML), ``/api/status`` (JSON), ``/adapters/<version>/<file>``.

The page is rendered on the server from one :func:`status_snapshot` (no front-end build, no script):
the swarm map (which peers serve which spans, their throughput and state), the current round's
progress, and the adapter registry with lineage, eval figures and download links. Downloads only
serve the regular files the registry's adapter directory lists, by exact name, so a request can
never reach outside it.
"""

from __future__ import annotations

import json
import math
import mimetypes
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from coordinator.assignment import span_loads
from coordinator.blobs import adapter_files
from coordinator.context import CoordinatorContext
from coordinator.metrics import eval_losses
from coordinator.rounds import live_replicas, round_progress
from coordinator.state import MemberState
from coordinator.status_render import render_page
from swarm.adapter import read_manifest
from swarm.http import Request, Response, Route, file_chunks

ADAPTERS_PREFIX = "/adapters/"


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _adapter_entry(ctx: CoordinatorContext, a: Any, eval_loss: float | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "version": a.version, "parents": list(a.parents), "round_id": a.round_id, "created_at": a.created_at,
        "eval_loss_before": _finite(a.eval_loss_before), "eval_loss_after": _finite(a.eval_loss_after),
        "eval_loss_reported": _finite(eval_loss), "sha256": a.sha256, "files": [], "contributors": [], "error": "",
    }  # fmt: skip
    try:
        entry["files"] = [
            {"name": p.name, "size": p.stat().st_size, "url": f"{ADAPTERS_PREFIX}{a.version}/{p.name}"}
            for p in served_files(Path(a.path))
        ]
        manifest = read_manifest(a.path)
        entry["contributors"] = [c.model_dump() for c in manifest.contributors]
        entry["method"] = manifest.method
    except (OSError, ValueError) as e:
        entry["error"] = str(e)
    return entry


def status_snapshot(ctx: CoordinatorContext) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-able data (also served at ``/api/status``).

    Read without the handlers' lock (each store call is atomic on its own; the page may be a heartbeat
    behind), so a slow or flooded status page never holds up an RPC.
    """
    now = ctx.clock()
    store = ctx.store
    rounds = store.list_rounds()
    current = store.current_round()
    adapters = store.list_adapters()
    evals = eval_losses(store)
    members = store.list_members(current.round_id) if current else []
    replicas = live_replicas(store, current.round_id) if current else []
    progress = round_progress(store, current, now) if current else None
    snap: dict[str, Any] = {
        "generated_at": now,
        "software_version": ctx.config.software_version,
        "round": None,
        "spans": [],
        "peers": [],
        "rounds": [{"round_id": r.round_id, "state": r.state.value, "parent": r.parent_adapter} for r in rounds],
        "adapters": [_adapter_entry(ctx, a, evals.get(a.version)) for a in adapters],
        "training_eval_loss": {k: v for k, v in evals.items() if k.endswith("-training")},
    }
    if current is None or progress is None:
        return snap
    spec = current.spec
    end = spec.end
    limits = []
    for name, done, target in (("samples", progress.samples, end.target_samples),
                               ("epochs", progress.epochs, end.target_epochs),
                               ("seconds", progress.elapsed_s, end.deadline_s)):  # fmt: skip
        if target:
            limits.append({"limit": name, "done": done, "target": target, "fraction": min(done / target, 1.0)})
    snap["round"] = {
        "round_id": current.round_id, "state": current.state.value, "created_at": current.created_at,
        "started_at": current.started_at, "ended_at": current.ended_at, "parent_adapter": current.parent_adapter,
        "base_model": spec.base.path, "num_layers": spec.base.num_layers, "samples": progress.samples,
        "epochs": progress.epochs, "elapsed_s": progress.elapsed_s, "limits": limits,
        "fraction": max((x["fraction"] for x in limits), default=0.0),
        "removed": [{"peer_id": m.peer_id, "reason": m.removed_reason} for m in members
                    if m.state is MemberState.EXPELLED],  # the round record names who was caught and why
    }  # fmt: skip
    loads = span_loads(replicas, len(spec.spans))
    for i, (span, load) in enumerate(zip(spec.spans, loads, strict=True)):
        snap["spans"].append({
            "index": i, "name": span.name, "start": span.start, "end": span.end, "live_replicas": load.replicas,
            "throughput": load.throughput, "peers": [m.peer_id for m in members if m.span_index == i and m.live],
        })  # fmt: skip
    for m in members:
        span_name = spec.spans[m.span_index].name if 0 <= m.span_index < len(spec.spans) else "trainer only"
        snap["peers"].append({
            "peer_id": m.peer_id, "span": span_name, "span_index": m.span_index, "state": m.state.value,
            "throughput": m.throughput, "epoch": m.epoch, "loss": _finite(m.loss), "samples": m.session_samples,
            "tokens": m.session_tokens, "device": m.capacity.device, "joined_at": m.joined_at,
            "heartbeat_age_s": max(now - m.last_heartbeat, 0.0), "multiaddrs": list(m.multiaddrs),
            "quantize": m.capacity.quantize, "pinned": m.pinned, "removed_reason": m.removed_reason,
        })  # fmt: skip
    return snap


def served_files(directory: Path) -> list[Path]:
    """The files of an adapter directory that may be downloaded: regular, visible, not symlinks."""
    return [p for p in adapter_files(directory) if not p.is_symlink()]


def adapter_file(ctx: CoordinatorContext, rest: str) -> Path | None:
    """The file ``<version>/<name>`` of a registered adapter, or ``None``: never a path outside its directory."""
    version, sep, name = unquote(rest).partition("/")
    if not sep or not version or not name or "/" in name:
        return None
    adapter = ctx.store.get_adapter(version)
    if adapter is None:
        return None
    try:
        files = served_files(Path(adapter.path))
    except FileNotFoundError:
        return None
    return next((p for p in files if p.name == name), None)


class SnapshotCache:
    """The latest :func:`status_snapshot`, rebuilt at most every ``ttl_s`` (one build at a time): a flood
    of page loads costs one store read per ``ttl_s``."""

    def __init__(self, ctx: CoordinatorContext, ttl_s: float = 1.0) -> None:
        self.ctx, self.ttl_s = ctx, ttl_s
        self._lock = threading.Lock()
        self._at: float = -1e18
        self._snap: dict[str, Any] = {}

    def get(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.ttl_s:
                self._snap, self._at = status_snapshot(self.ctx), now
            return self._snap


def status_routes(ctx: CoordinatorContext) -> tuple[dict[str, Route], dict[str, Route]]:
    """``(routes, prefix_routes)`` for :class:`coordinator.status_http.StatusHttpServer`."""
    cache = SnapshotCache(ctx)

    def page(_: Request) -> Response:
        return Response.html(render_page(cache.get()), headers=(("Cache-Control", "no-store"),))

    def api(_: Request) -> Response:
        return Response.json(json.dumps(cache.get(), indent=1), headers=(("Cache-Control", "no-store"),))

    def download(request: Request) -> Response:
        path = adapter_file(ctx, request.path[len(ADAPTERS_PREFIX) :])
        if path is None:
            return Response.text(
                f"no such adapter file: {request.path[:200]}; links are listed on / and in /api/status\n", 404
            )
        kind = "application/json" if path.suffix == ".json" else mimetypes.guess_type(path.name)[0]
        disposition = ("Content-Disposition", f'attachment; filename="{path.name}"')
        length = ("Content-Length", str(path.stat().st_size))
        return Response(200, file_chunks(str(path)), kind or "application/octet-stream", (disposition, length))

    return {"/": page, "/index.html": page, "/api/status": api}, {ADAPTERS_PREFIX: download}
