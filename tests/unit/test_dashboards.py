"""Grafana dashboards and Prometheus rules, checked without sockets.

The JSON files equal what deploy/dashboards.py generates; panels sit on the grid without overlap;
every series a panel or an alert reads is one a component really exports; the required panels and
alerts exist. tests/integration/test_monitoring.py runs the same queries against a live swarm.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from coordinator.config import CoordinatorConfig
from coordinator.context import CoordinatorContext
from coordinator.round_metrics import register_round_metrics
from peer.metrics import PeerMetrics

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SERIES = re.compile(r"\b(swarm_(?:peer|coordinator)_[a-z0-9_]+)\b")
ALLOWED_VARIABLES = {"$__rate_interval", "$instance"}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_dashboards", DEPLOY / "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))}


def _exported(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can expose (counters as _total, histograms as _bucket/_sum/_count)."""
    names = set()
    for family in registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def _known_series(tmp_path: Path) -> set[str]:
    ctx = CoordinatorContext.from_config(CoordinatorConfig(workdir=tmp_path, store="memory", metrics_port=None))
    register_round_metrics(ctx)
    return _exported(PeerMetrics().registry) | _exported(ctx.metrics.registry)


def test_files_equal_the_generator() -> None:
    gen = _generator()
    assert sorted(gen.DASHBOARDS) == sorted(_dashboards()), "a dashboard file without generator (or the reverse)"
    for name in gen.DASHBOARDS:
        text = (DEPLOY / "grafana" / "dashboards" / name).read_text()
        assert text == gen.render(name), f"{name} is stale: run python deploy/dashboards.py"


def test_panels_are_well_formed_and_laid_out() -> None:
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    uids = set()
    for name, board in _dashboards().items():
        uids.add(board["uid"])
        panels = board["panels"]
        assert len({p["id"] for p in panels}) == len(panels), f"{name}: duplicate panel ids"
        cells: set[tuple[int, int]] = set()
        for p in panels:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{name}/{p['title']}: off the grid"
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & area, f"{name}/{p['title']} overlaps another panel"
            cells |= area
            if p["type"] == "row":
                continue
            assert p["title"] and p["datasource"]["uid"] == uid and p["targets"], f"{name}/{p['title']}"
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
            for t in p["targets"]:
                assert t["datasource"]["uid"] == uid and t["expr"].strip()
                assert set(re.findall(r"\$\w+", t["expr"])) <= ALLOWED_VARIABLES, t["expr"]
                assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    assert uids == {"swarm-overview", "swarm-my-peer"}


def test_required_panels_exist() -> None:
    boards = {b["title"]: {p["title"] for p in b["panels"] if p["type"] != "row"} for b in _dashboards().values()}
    assert boards["Swarm overview"] >= {
        "Round state", "Round progress", "Live members by span", "Span coverage", "Span throughput (samples/s)",
        "Swarm training throughput", "Eval loss by adapter version", "Averaging rounds by outcome",
        "Averaging success ratio", "Bytes on the wire",
    }  # fmt: skip
    assert boards["My peer"] >= {
        "Span and round", "Samples/s trained", "Loss", "Step time", "Averaging time", "Requests served",
        "Request latency", "Memory",
    }  # fmt: skip
    my_peer = next(b for b in _dashboards().values() if b["title"] == "My peer")
    variables = {v["name"]: v for v in my_peer["templating"]["list"]}
    assert "swarm_peer_info" in variables["instance"]["definition"]


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def test_every_series_read_is_exported(tmp_path: Path) -> None:
    known = _known_series(tmp_path)
    exprs = [t["expr"] for b in _dashboards().values() for p in b["panels"] for t in p.get("targets", [])]
    exprs += [r["expr"] for r in _rules()]
    used = {m for e in exprs for m in SERIES.findall(e)}
    assert used, "no swarm series found in the queries"
    assert not used - known, f"queries read series nobody exports: {sorted(used - known)}"


def test_alert_rules_cover_the_failure_modes() -> None:
    rules = {r["alert"]: r for r in _rules()}
    required = {
        "SwarmSpanWithoutServer": "swarm_coordinator_span_live_replicas",
        "SwarmPeerMissingHeartbeats": "swarm_coordinator_member_heartbeat_age_seconds",
        "SwarmAveragingFailureRate": "swarm_peer_averaging_rounds_total",
        "SwarmLossNaN": "swarm_peer_loss",
        "SwarmTrainingLossRising": "swarm_peer_loss",
        "SwarmRoundPastDeadline": "swarm_coordinator_round_deadline_seconds",
    }
    for alert, series in required.items():
        assert series in rules[alert]["expr"], alert
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name


def test_prometheus_scrapes_both_components() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"swarm-coordinator", "swarm-peers"}
    assert all(j.get("metrics_path", "/metrics") == "/metrics" for j in jobs.values())
    assert config["rule_files"] == ["rules.yml"]
    # the job names the rules and dashboards filter on
    text = (DEPLOY / "prometheus" / "rules.yml").read_text() + json.dumps(_dashboards())
    assert set(re.findall(r'job=\\?"([\w-]+)\\?"', text)) <= set(jobs)
