"""Retention: what the coordinator forgets once rounds end, so disk and database stay bounded.

Kept: every round, member, contribution and published adapter (the registry and its lineage).
Dropped for every ended round but the newest ``keep_rounds``: its uploaded span states and candidate
(``blob_dir/<round>/``) and its eval reports. The candidate of an ended round leaves memory at once.
Call with the coordinator lock held.
"""

from __future__ import annotations

import logging
import shutil

from coordinator.context import CoordinatorContext

log = logging.getLogger(__name__)


def prune(ctx: CoordinatorContext) -> list[str]:
    """Apply the retention rules; returns the rounds whose blobs and eval reports were dropped."""
    rounds = ctx.store.list_rounds()
    for round_id in [r for r in ctx.candidates if not any(x.round_id == r and x.state.active for x in rounds)]:
        del ctx.candidates[round_id]
    ended = [r for r in rounds if r.state.terminal]
    dropped = []
    for record in ended[: max(len(ended) - ctx.config.keep_rounds, 0)]:
        folder = ctx.config.blob_dir / record.round_id
        deleted = ctx.store.delete_eval_reports(record.round_id)
        if folder.exists() or deleted:
            shutil.rmtree(folder, ignore_errors=True)
            dropped.append(record.round_id)
    if dropped:
        log.info("retention: dropped span states and eval reports of round(s) %s", ", ".join(dropped))
    return dropped
