"""Generate the Grafana dashboards of deploy/grafana/dashboards/ from code.

    python deploy/dashboards.py          # rewrite the JSON files
    python deploy/dashboards.py --check  # exit 1 if a file differs from what the code generates

Every panel is a PromQL query over ``swarm_coordinator_*`` / ``swarm_peer_*`` series (see
coordinator/metrics.py, coordinator/round_metrics.py, peer/metrics.py). Queries may use two Grafana
variables only: ``$__rate_interval`` and, on "My peer", ``$instance``. tests/unit/test_dashboards.py
keeps the files equal to this code; tests/integration/test_monitoring.py runs every query against a
live swarm.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
RATE = "$__rate_interval"
COLS = 24


@dataclass(frozen=True)
class Q:
    """One query of a panel: PromQL and its legend."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Q, ...]
    kind: str = "timeseries"  # timeseries | stat | gauge | bargauge
    unit: str = "short"
    width: int = 8
    height: int = 7
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    max: float | None = None


def _rate(metric: str, selector: str = "") -> str:
    return f"rate({metric}{selector}[{RATE}])"


def _quantile(q: float, metric: str, by: str = "", selector: str = "") -> str:
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({_rate(metric + '_bucket', selector)}))"


def _panel_json(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {"datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend or "__auto", "refId": chr(ord("A") + i),
         "range": True, "instant": p.kind != "timeseries"}
        for i, q in enumerate(p.queries)
    ]  # fmt: skip
    defaults: dict[str, Any] = {"unit": p.unit}
    if p.max is not None:
        defaults.update(min=0, max=p.max)
    out: dict[str, Any] = {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description, "datasource": DATASOURCE,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y}, "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
    }  # fmt: skip
    if p.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "desc"}}  # fmt: skip
        out["fieldConfig"]["defaults"]["custom"] = {"lineWidth": 2, "fillOpacity": 8, "spanNulls": True}
    else:
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "orientation": "auto", **p.options}  # fmt: skip
    return out


def _layout(rows: list[tuple[str, list[Panel]]]) -> list[dict[str, Any]]:
    """Rows of panels on Grafana's 24-column grid; a row header before each group."""
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for title, group in rows:
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": COLS, "x": 0, "y": y}})  # fmt: skip
        pid, y = pid + 1, y + 1
        x, row_h = 0, 0
        for p in group:
            if x + p.width > COLS:
                x, y, row_h = 0, y + row_h, 0
            panels.append(_panel_json(p, pid, x, y))
            pid, x, row_h = pid + 1, x + p.width, max(row_h, p.height)
        y += row_h
    return panels


def _dashboard(uid: str, title: str, description: str, rows: list[tuple[str, list[Panel]]],
               templating: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    return {
        "uid": uid, "title": title, "description": description, "tags": ["loraswarm"], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser", "graphTooltip": 1, "annotations": {"list": []},
        "templating": {"list": templating}, "panels": _layout(rows),
        "links": [{"title": "My peer", "type": "dashboards", "tags": ["loraswarm"], "asDropdown": False}],
    }  # fmt: skip


def overview() -> dict[str, Any]:
    """Swarm overview: round, members and coverage, throughput, quality, averaging, network."""
    samples_frac = "swarm_coordinator_round_samples / (swarm_coordinator_round_target_samples > 0)"
    epochs_frac = "swarm_coordinator_round_epoch / (swarm_coordinator_round_target_epochs > 0)"
    time_frac = "swarm_coordinator_round_elapsed_seconds / (swarm_coordinator_round_deadline_seconds > 0)"
    avg, ok = "swarm_peer_averaging_rounds_total", '{outcome="success"}'
    rows = [
        ("Round", [
            Panel("Round state", (Q("swarm_coordinator_round_info", "{{round}}: {{state}}"),), "stat", width=6,
                  height=5, options={"textMode": "name", "colorMode": "background"},
                  description="The current round and its lifecycle state."),
            Panel("Round progress", (Q(samples_frac, "samples"), Q(epochs_frac, "epochs"), Q(time_frac, "deadline")),
                  "bargauge", "percentunit", width=6, height=5, max=1,
                  description="Fraction of each end limit reached; the first to reach 100% ends the round."),
            Panel("Samples trained in the round", (Q("swarm_coordinator_round_samples", "{{round}}"),
                                                   Q("swarm_coordinator_round_target_samples", "target")),
                  width=6, height=5),
            Panel("Rounds by state", (Q("swarm_coordinator_rounds", "{{state}}"),), "bargauge", width=6, height=5,
                  options={"displayMode": "basic"}),
        ]),
        ("Members and coverage", [
            Panel("Live members by span", (Q('sum by (span) (swarm_coordinator_members{state="live"})', "span {{span}}"),),
                  "bargauge", width=8, options={"displayMode": "gradient"}),
            Panel("Members by state", (Q("sum by (state) (swarm_coordinator_members)", "{{state}}"),), width=8),
            Panel("Span coverage", (Q("swarm_coordinator_spans_covered / swarm_coordinator_spans", "covered"),),
                  "gauge", "percentunit", width=4, max=1,
                  description="Spans with at least one live server; below 100% nobody can train."),
            Panel("Live servers per span", (Q("swarm_coordinator_span_live_replicas", "span {{span}}"),),
                  "stat", width=4, options={"colorMode": "value", "textMode": "value_and_name"}),
            Panel("Heartbeat age by peer", (Q("swarm_coordinator_member_heartbeat_age_seconds", "{{peer}} ({{span}})"),
                                            Q("swarm_coordinator_heartbeat_timeout_seconds", "timeout")),
                  unit="s", width=12),
            Panel("Join rejections (1h)", (Q("sum by (reason) (increase(swarm_coordinator_join_rejections_total[1h]))",
                                             "{{reason}}"),), "bargauge", width=6),
            Panel("Peers scraped up", (Q('sum(up{job="swarm-peers"})', "up"), Q('count(up{job="swarm-peers"})', "targets")),
                  "stat", width=6),
        ]),
        ("Throughput and quality", [
            Panel("Span throughput (samples/s)", (Q("swarm_coordinator_span_throughput", "span {{span}}"),),
                  unit="none", width=8, description="Summed measured throughput of the live servers of each span."),
            Panel("Swarm training throughput", (Q(f"sum({_rate('swarm_peer_samples_total')})", "samples/s"),
                                                Q(f"sum({_rate('swarm_peer_tokens_total')})", "tokens/s")),
                  unit="none", width=8),
            Panel("Eval loss by adapter version", (Q("swarm_coordinator_eval_loss", "{{version}}"),), width=8,
                  description="Token-weighted held-out loss; '<round>-training' is the round in progress."),
            Panel("Training loss by peer", (Q("swarm_peer_loss", "{{instance}}"),
                                            Q("swarm_peer_eval_loss", "eval {{instance}}")), width=12),
            Panel("Optimizer epoch by peer", (Q("swarm_peer_epoch", "{{instance}}"),
                                              Q("swarm_coordinator_round_epoch", "round (slowest span)")), width=12),
        ]),
        ("Averaging and network", [
            Panel("Averaging rounds by outcome", (Q(f"sum by (outcome) ({_rate(avg)})", "{{outcome}}"),), unit="ops",
                  width=8),
            Panel("Averaging success ratio", (Q(f"sum({_rate(avg, ok)}) / sum({_rate(avg)})", "success"),), "gauge",
                  "percentunit", width=4, max=1, description="Share of all-reduce rounds that succeeded."),
            Panel("All-reduce duration", (Q(_quantile(0.5, "swarm_peer_averaging_seconds"), "p50"),
                                          Q(_quantile(0.9, "swarm_peer_averaging_seconds"), "p90")), unit="s",
                  width=6),
            Panel("Bytes on the wire", (Q(f"sum by (direction) ({_rate('swarm_peer_bytes_total')})", "{{direction}}"),),
                  unit="Bps", width=6),
            Panel("Remote calls served", (Q(f"sum by (kind) ({_rate('swarm_peer_requests_served_total')})", "{{kind}}"),
                                          Q(f"sum({_rate('swarm_peer_failovers_total')})", "failovers")),
                  unit="reqps", width=12),
            Panel("Coordinator RPC latency p90", (Q(_quantile(0.9, "swarm_coordinator_rpc_duration_seconds", "method"),
                                                    "{{method}}"),), unit="s", width=12),
        ]),
    ]  # fmt: skip
    return _dashboard("swarm-overview", "Swarm overview", "The whole swarm: round, coverage, throughput, "
                      "quality, averaging, traffic.", rows, [])  # fmt: skip


def my_peer() -> dict[str, Any]:
    """My peer: one daemon's span, training speed, loss, step/averaging times, serving, memory."""
    sel = '{instance=~"$instance"}'
    instance_var = {
        "name": "instance", "label": "Peer", "type": "query", "datasource": DATASOURCE,
        "query": {"query": "label_values(swarm_peer_info, instance)", "refId": "PeerVariable"},
        "definition": "label_values(swarm_peer_info, instance)", "refresh": 2, "sort": 1,
        "includeAll": False, "multi": False, "current": {},
    }  # fmt: skip
    rows = [
        ("This peer", [
            Panel("Span and round", (Q(f"swarm_peer_info{sel}", "span {{span}} · round {{round_id}} · {{device}}"),),
                  "stat", width=10, height=4, options={"textMode": "name", "colorMode": "none"}),
            Panel("Optimizer epoch", (Q(f"swarm_peer_epoch{sel}", "epoch"),), "stat", width=4, height=4),
            Panel("Measured throughput", (Q(f"swarm_peer_throughput{sel}", "samples/s"),), "stat", "none", width=5,
                  height=4),
            Panel("Memory (RSS)", (Q(f"swarm_peer_memory_bytes{sel}", "rss"),), "stat", "bytes", width=5, height=4),
        ]),
        ("Training", [
            Panel("Samples/s trained", (Q(_rate("swarm_peer_samples_total", sel), "samples/s"),), unit="none", width=6),
            Panel("Tokens/s trained", (Q(_rate("swarm_peer_tokens_total", sel), "tokens/s"),), unit="none", width=6),
            Panel("Loss", (Q(f"swarm_peer_loss{sel}", "train"), Q(f"swarm_peer_eval_loss{sel}", "held-out")),
                  width=12),
            Panel("Step time", (Q(_quantile(0.5, "swarm_peer_step_seconds", selector=sel), "p50"),
                                Q(_quantile(0.9, "swarm_peer_step_seconds", selector=sel), "p90")), unit="s", width=12),
            Panel("Averaging time", (Q(_quantile(0.5, "swarm_peer_averaging_seconds", selector=sel), "p50"),
                                     Q(_quantile(0.9, "swarm_peer_averaging_seconds", selector=sel), "p90")),
                  unit="s", width=12),
            Panel("Averaging rounds", (Q(f"sum by (outcome) ({_rate('swarm_peer_averaging_rounds_total', sel)})",
                                         "{{outcome}}"),), unit="ops", width=12),
            Panel("Servers seen per span", (Q(f"swarm_peer_peers_seen{sel}", "span {{span}}"),), width=12,
                  description="Replicas of each span this peer's router sees in the DHT."),
        ]),
        ("Serving", [
            Panel("Requests served", (Q(f"sum by (kind) ({_rate('swarm_peer_requests_served_total', sel)})",
                                        "{{kind}}"),), unit="reqps", width=8),
            Panel("Request latency", (Q(_quantile(0.5, "swarm_peer_request_seconds", "kind", sel), "p50 {{kind}}"),
                                      Q(_quantile(0.9, "swarm_peer_request_seconds", "kind", sel), "p90 {{kind}}")),
                  unit="s", width=8),
            Panel("Bytes on the wire", (Q(f"sum by (direction) ({_rate('swarm_peer_bytes_total', sel)})",
                                          "{{direction}}"),), unit="Bps", width=8),
            Panel("Memory", (Q(f"swarm_peer_memory_bytes{sel}", "rss"),), unit="bytes", width=8),
            Panel("Failovers to another replica", (Q(_rate("swarm_peer_failovers_total", sel), "failovers/s"),),
                  unit="ops", width=8),
            Panel("Activation spot checks", (Q(f"sum by (outcome) ({_rate('swarm_peer_spot_checks_total', sel)})",
                                               "{{outcome}}"),), unit="ops", width=8),
        ]),
    ]  # fmt: skip
    return _dashboard("swarm-my-peer", "My peer", "One peer daemon: pick it with the Peer variable.", rows,
                      [instance_var])  # fmt: skip


DASHBOARDS = {"swarm-overview.json": overview, "swarm-my-peer.json": my_peer}


def render(name: str) -> str:
    """The file text of dashboard ``name`` (stable: sorted keys, trailing newline)."""
    return json.dumps(DASHBOARDS[name](), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in DASHBOARDS:
        path, text = OUT_DIR / name, render(name)
        if check:
            if not path.is_file() or path.read_text("utf-8") != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, "utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python deploy/dashboards.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
