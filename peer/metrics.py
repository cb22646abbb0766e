"""Prometheus metrics of one peer daemon (own CollectorRegistry) and the /metrics + /health HTTP thread."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from swarm import __version__
from swarm.http import HttpServerThread, Request, Response

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PeerMetrics:
    """Every ``swarm_peer_*`` series; safe to update from any thread."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.info = Gauge(
            "swarm_peer_info",
            "Static facts about this peer (value 1).",
            ["peer_id", "round_id", "span", "version", "device"],
            registry=r,
        )
        self.span_start = Gauge("swarm_peer_span_start", "First block this peer serves.", registry=r)
        self.span_end = Gauge("swarm_peer_span_end", "One past the last block this peer serves.", registry=r)
        self.samples = Counter("swarm_peer_samples", "Sequences this peer's trainer processed.", registry=r)
        self.tokens = Counter("swarm_peer_tokens", "Tokens this peer's trainer processed.", registry=r)
        self.loss = Gauge("swarm_peer_loss", "Training loss of the trainer's last micro-batch.", registry=r)
        self.eval_loss = Gauge("swarm_peer_eval_loss", "Held-out loss measured by this peer.", registry=r)
        self.step_seconds = Histogram(
            "swarm_peer_step_seconds", "Duration of one trainer micro-batch step.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.averaging_seconds = Histogram(
            "swarm_peer_averaging_seconds", "Duration of a gradient all-reduce.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.averaging = Counter(
            "swarm_peer_averaging_rounds",
            "Gradient averaging rounds by outcome (local_fallback = proceeding with local gradients).",
            ["outcome"],
            registry=r,
        )
        self.bytes = Counter("swarm_peer_bytes", "Tensor bytes on the wire by direction.", ["direction"], registry=r)
        self.requests = Counter(
            "swarm_peer_requests_served", "Remote forward/backward batches served.", ["kind"], registry=r
        )
        self.request_seconds = Histogram(
            "swarm_peer_request_seconds",
            "Latency of served forward/backward.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.epoch = Gauge("swarm_peer_epoch", "hivemind.Optimizer epoch of the span this peer serves.", registry=r)
        self.throughput = Gauge("swarm_peer_throughput", "Measured samples/s of forward+backward.", registry=r)
        self.peers_seen = Gauge("swarm_peer_peers_seen", "Servers seen in the DHT per span.", ["span"], registry=r)
        self.failovers = Counter(
            "swarm_peer_failovers", "Remote calls that failed over to another replica.", registry=r
        )
        self.spot_checks = Counter(
            "swarm_peer_spot_checks",
            "Remote forwards compared with other replicas, by outcome: agree, outvoted (a replica outvoted by two "
            "agreeing ones: reported), undecided (two replicas disagree, no third to decide).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("agree", "outvoted", "undecided"):
            self.spot_checks.labels(outcome=outcome)
        self.memory = Gauge("swarm_peer_memory_bytes", "Resident memory of the daemon process.", registry=r)
        self.memory.set_function(lambda: float(psutil.Process().memory_info().rss))
        self.block_bytes = Gauge(
            "swarm_peer_block_bytes",
            "Resident bytes of one hosted block's frozen base weights (mean over the span), by quantization.",
            ["quantize"],
            registry=r,
        )
        for outcome in ("success", "local_fallback"):
            self.averaging.labels(outcome)
        for kind in ("forward", "backward"):
            self.requests.labels(kind)
            self.request_seconds.labels(kind)
        for direction in ("sent", "received"):
            self.bytes.labels(direction)

    def set_identity(self, peer_id: str, round_id: str, span: tuple[int, int] | None, device: str) -> None:
        """``span`` None: a trainer-only peer (span label "none", span start and end -1)."""
        self.info.clear()
        self.info.labels(peer_id, round_id, f"{span[0]}-{span[1]}" if span else "none", __version__, device).set(1)
        self.span_start.set(span[0] if span else -1)
        self.span_end.set(span[1] if span else -1)

    def set_block_bytes(self, quantize: str, nbytes: int) -> None:
        self.block_bytes.clear()
        self.block_bytes.labels(quantize).set(nbytes)

    def served(self, kind: str, batch: int, seconds: float) -> None:
        self.requests.labels(kind).inc()
        self.request_seconds.labels(kind).observe(seconds)

    def averaged(self, ok: bool, seconds: float) -> None:
        self.averaging.labels("success" if ok else "local_fallback").inc()
        self.averaging_seconds.observe(seconds)

    def wire(self, sent: int, received: int) -> None:
        self.bytes.labels("sent").inc(sent)
        self.bytes.labels("received").inc(received)

    def set_peers_seen(self, per_span: dict[str, int]) -> None:
        for span, n in per_span.items():
            self.peers_seen.labels(span).set(n)


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text) and ``/health`` (JSON) from a daemon thread, started at once.

    Any other path also answers with the metrics text (scrapers configured with another path keep working).
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, health: Callable[[], dict[str, Any]]):
        def health_route(_: Request) -> Response:
            body = health()
            return Response.json(json.dumps(body), 200 if body.get("ok") else 503)

        def metrics_text(_: Request) -> Response:
            return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

        self.http = HttpServerThread(
            host, port, registry=registry, routes={"/health": health_route}, fallback=metrics_text, name="metrics-http"
        ).start()
        self.port = self.http.port

    def stop(self) -> None:
        self.http.stop()
