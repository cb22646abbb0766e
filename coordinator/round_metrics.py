"""Scrape-time series the alert rules and dashboards need on top of :mod:`coordinator.metrics`.

``deploy/prometheus/rules.yml`` alerts on a round past its deadline and on members that stopped
heartbeating; both need times that the store holds but the core metrics do not export.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from coordinator.context import CoordinatorContext
from coordinator.state import MemberState

P = "swarm_coordinator_"


class RoundTimingCollector:
    """Current round identity and timing, heartbeat ages of its live members, the heartbeat settings."""

    def __init__(self, ctx: CoordinatorContext) -> None:
        self.ctx = ctx

    def describe(self) -> list[Metric]:
        return list(self._families().values())

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        g = GaugeMetricFamily
        return {
            "info": g(P + "round_info", "The current round (value 1) and its lifecycle state.", labels=["round", "state"]),
            "elapsed": g(P + "round_elapsed_seconds", "Seconds the current round has trained (frozen once it ends).",
                         labels=["round"]),
            "deadline": g(P + "round_deadline_seconds", "Training seconds after which the round must end "
                          "(0 = no deadline).", labels=["round"]),
            "age": g(P + "member_heartbeat_age_seconds", "Seconds since each live member's last heartbeat.",
                     labels=["peer", "span"]),
            "interval": g(P + "heartbeat_interval_seconds", "Seconds between heartbeats that peers are asked for."),
            "timeout": g(P + "heartbeat_timeout_seconds", "Silence after which a member is marked dead."),
        }  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        f = self._families()
        cfg = self.ctx.config
        f["interval"].add_metric([], cfg.heartbeat_interval_s)
        f["timeout"].add_metric([], cfg.heartbeat_timeout_s)
        store, now = self.ctx.store, self.ctx.clock()
        current = store.current_round()
        if current is not None:
            rid = current.round_id
            f["info"].add_metric([rid, current.state.value], 1)
            elapsed = 0.0
            if current.started_at is not None:
                elapsed = max((current.ended_at or now) - current.started_at, 0.0)
            f["elapsed"].add_metric([rid], elapsed)
            f["deadline"].add_metric([rid], current.spec.end.deadline_s)
            spans = current.spec.spans
            for m in store.list_members(rid, MemberState.LIVE):
                span = spans[m.span_index].name if 0 <= m.span_index < len(spans) else str(m.span_index)
                f["age"].add_metric([m.peer_id, span], max(now - m.last_heartbeat, 0.0))
        yield from f.values()


def register_round_metrics(ctx: CoordinatorContext) -> None:
    """Add :class:`RoundTimingCollector` to the coordinator's registry (call once per context)."""
    ctx.metrics.registry.register(RoundTimingCollector(ctx))
