"""Prometheus metrics of the coordinator, in their own ``CollectorRegistry``.

Event metrics (RPC latency, join rejections) are counters and histograms updated by the
handlers. State metrics (rounds, members, coverage, progress, adapters, eval loss) are read
from the store at scrape time, so they are right after a restart too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from coordinator.assignment import span_loads
from coordinator.rounds import live_replicas, round_progress
from coordinator.state import CoordinatorStore, MemberState
from swarm.proto import RoundState

P = "swarm_coordinator_"
#: Values of the ``outcome`` label of ``swarm_coordinator_finalize_total`` (coordinator.finalize.Outcome).
FINALIZE_OUTCOMES = ("published", "missing_span", "no_eval", "worse_than_parent", "nonfinite", "invalid_state",
                     "invalid_spec", "error")  # fmt: skip


class CoordinatorMetrics:
    """Metric objects of one coordinator; ``registry`` is what /metrics serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.join_rejections = Counter(P + "join_rejections", "Refused joins by reason.", ["reason"], registry=r)
        self.rpc_duration = Histogram(
            P + "rpc_duration_seconds",
            "gRPC handler latency by method.",
            ["method"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=r,
        )
        self.rpc_errors = Counter(P + "rpc_errors", "RPCs that failed, by method and status code.",
                                  ["method", "code"], registry=r)  # fmt: skip
        self.members_expired = Counter(P + "members_expired", "Members marked dead after missed heartbeats.",
                                       registry=r)  # fmt: skip
        self.rebalance_moves = Counter(P + "rebalance_moves", "Peers moved to an uncovered span.", registry=r)
        self.members_expelled = Counter(P + "members_expelled", "Members removed after a quorum of members caught "
                                        "them sending bad data.", registry=r)  # fmt: skip
        self.finalize = Counter(P + "finalize", "Finalized rounds by outcome (published or the failure reason).",
                                ["outcome"], registry=r)  # fmt: skip
        for outcome in FINALIZE_OUTCOMES:
            self.finalize.labels(outcome=outcome)
        self.replica_disagreements = Counter(
            P + "replica_disagreements", "Span replicas outvoted at finalization (uploads that disagreed).", registry=r
        )
        self.roster_publishes = Counter(P + "roster_publishes", "Roster publications in the DHT by result.",
                                        ["result"], registry=r)  # fmt: skip
        for result in ("ok", "error"):
            self.roster_publishes.labels(result=result)
        self.reachability_checks = Counter(
            P + "reachability_checks", "Peers dialed back for their self-check, by outcome (reached or not).",
            ["outcome"], registry=r,
        )  # fmt: skip
        for outcome in ("reached", "unreached"):
            self.reachability_checks.labels(outcome=outcome)

    def watch(self, store: CoordinatorStore, clock: Callable[[], float] = time.time) -> None:
        """Export the state metrics of ``store`` (call once)."""
        self.registry.register(StateCollector(store, clock))


class StateCollector:
    """Reads the store at scrape time; describes itself without touching it."""

    def __init__(self, store: CoordinatorStore, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock

    def describe(self) -> list[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        self._fill(families)
        yield from families.values()

    @staticmethod
    def _families() -> dict[str, Any]:
        g, c = GaugeMetricFamily, CounterMetricFamily
        return {
            "rounds": g(P + "rounds", "Rounds by lifecycle state.", labels=["state"]),
            "members": g(P + "members", "Members of the current round by span and state.", labels=["span", "state"]),
            "replicas": g(P + "span_live_replicas", "Live servers per span of the current round.", labels=["span"]),
            "throughput": g(P + "span_throughput", "Summed throughput of live servers per span.", labels=["span"]),
            "covered": g(P + "spans_covered", "Spans of the current round with at least one live server."),
            "spans": g(P + "spans", "Spans in the current round."),
            "samples": g(P + "round_samples", "Samples trained in the round so far.", labels=["round"]),
            "target": g(P + "round_target_samples", "Samples that end the round (0 = no such limit).",
                        labels=["round"]),
            "epoch": g(P + "round_epoch", "Epoch of the round's slowest span group.", labels=["round"]),
            "target_epochs": g(P + "round_target_epochs", "Epochs that end the round (0 = no such limit).",
                               labels=["round"]),
            "adapters": c(P + "adapters_published", "Adapters in the registry."),
            "eval": g(P + "eval_loss", "Token-weighted eval loss by adapter version.", labels=["version"]),
            "adapter_eval": g(P + "adapter_eval_loss", "Eval loss recorded in each published adapter's manifest.",
                              labels=["version", "phase"]),
        }  # fmt: skip

    def _fill(self, f: dict[str, Any]) -> None:
        store = self.store
        rounds = store.list_rounds()
        for state in RoundState:
            f["rounds"].add_metric([state.value], sum(r.state is state for r in rounds))
        adapters = store.list_adapters()
        f["adapters"].add_metric([], len(adapters))
        for a in adapters:
            for phase, loss in (("before", a.eval_loss_before), ("after", a.eval_loss_after)):
                if loss is not None:
                    f["adapter_eval"].add_metric([a.version, phase], loss)
        for version, loss in eval_losses(store).items():
            f["eval"].add_metric([version], loss)
        current = store.current_round()
        if current is None:
            return
        spans = current.spec.spans
        members = store.list_members(current.round_id)
        for i, span in enumerate(spans):
            for member_state in MemberState:
                count = sum(m.span_index == i and m.state is member_state for m in members)
                f["members"].add_metric([span.name, member_state.value], count)
        loads = span_loads(live_replicas(store, current.round_id), len(spans))
        for span, load in zip(spans, loads, strict=True):
            f["replicas"].add_metric([span.name], load.replicas)
            f["throughput"].add_metric([span.name], load.throughput)
        f["covered"].add_metric([], sum(s.replicas > 0 for s in loads))
        f["spans"].add_metric([], len(spans))
        progress = round_progress(store, current, self.clock())
        rid = [current.round_id]
        f["samples"].add_metric(rid, progress.samples)
        f["target"].add_metric(rid, current.spec.end.target_samples)
        f["epoch"].add_metric(rid, progress.epochs)
        f["target_epochs"].add_metric(rid, current.spec.end.target_epochs)


def eval_losses(store: CoordinatorStore) -> dict[str, float]:
    """Token-weighted eval loss per adapter version.

    Reports that name a version count for it; reports on a round's in-progress adapter count for
    ``<round>-training`` at the latest epoch reported. A registered adapter without reports
    shows its recorded ``eval_loss_after``.
    """
    latest_epoch: dict[str, int] = {}
    sums: dict[str, tuple[float, int]] = {}
    reports = store.list_eval_reports()
    for e in reports:
        if not e.adapter_version:
            latest_epoch[e.round_id] = max(latest_epoch.get(e.round_id, 0), e.epoch)
    for e in reports:
        if e.adapter_version:
            label = e.adapter_version
        elif e.epoch == latest_epoch[e.round_id]:
            label = f"{e.round_id}-training"
        else:
            continue
        loss_sum, tokens = sums.get(label, (0.0, 0))
        sums[label] = (loss_sum + e.eval_loss * e.eval_tokens, tokens + e.eval_tokens)
    out = {label: s / t for label, (s, t) in sums.items() if t > 0}
    for a in store.list_adapters():
        if a.version not in out and a.eval_loss_after is not None:
            out[a.version] = a.eval_loss_after
    return out
