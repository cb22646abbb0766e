"""Start a coordinator in-process: ``server = serve(CoordinatorConfig(port=0)); ...; server.stop()``."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.config import CoordinatorConfig
from coordinator.context import CoordinatorContext
from coordinator.membership import Sweeper
from coordinator.periodic import Periodic
from coordinator.publish import continue_series, finalize_step, series_rounds
from coordinator.round_metrics import register_round_metrics
from coordinator.servicer import CoordinatorServicer
from coordinator.status_http import StatusHttpServer
from coordinator.status_page import status_routes
from swarm.keys import load_or_create_signing_key, write_public_key
from swarm.proto import SERVICE_NAME
from swarm.tls import ensure_certificate, server_credentials

if TYPE_CHECKING:
    import hivemind

log = logging.getLogger(__name__)

__all__ = ["CoordinatorConfig", "CoordinatorServer", "serve"]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class CoordinatorServer:
    """gRPC service + health + /metrics + membership sweep, sharing one :class:`CoordinatorContext`."""

    def __init__(self, config: CoordinatorConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.ctx = CoordinatorContext.from_config(config, clock)
        self.port = 0
        self.metrics_port: int | None = None
        self._grpc: grpc.Server | None = None
        self._health = health.HealthServicer()
        self._http: StatusHttpServer | None = None
        self._sweeper = Sweeper(self.ctx)
        self._threads: list[Periodic] = []  # finalizer, roster publisher
        self.dht: hivemind.DHT | None = None
        self._serving = False
        self._closed = False

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC service (see :attr:`tls_cert_path` for the certificate to pin)."""
        return _hostport(self.config.host, self.port)

    @property
    def tls_cert_path(self) -> Path | None:
        """The certificate peers pin (``swarm.tls.channel``); None when serving plaintext (``insecure``)."""
        return None if self.config.insecure else self.config.tls_cert_path

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://{_hostport(self.config.host, self.metrics_port)}/metrics"

    @property
    def public_key_path(self) -> Path:
        """PEM public key of the adapter signing key: what peers need (``--coordinator-public-key``)."""
        return self.config.public_key_path

    def _open_configured_round(self) -> None:
        """Open the configured round, or the next of its series (e.g. after a restart), if none is active."""
        spec = self.config.round_spec
        if spec is None:
            return
        with self.ctx.lock:
            active = self.ctx.store.active_round()
            if active is not None:
                if active not in series_rounds(self.ctx):
                    log.warning("round %s is %s; round spec %s waits until it ends", active.round_id,
                                active.state.value, spec.round_id)  # fmt: skip
                return
            if continue_series(self.ctx, self.ctx.clock()) is None:  # a conflict is logged as a warning
                log.info("no round opened for round spec %s (series done, or see the warning above)", spec.round_id)

    def _start_background(self) -> None:
        """Signing key, DHT node (a process: started before gRPC spawns threads), finalizer and roster threads."""
        cfg = self.config
        key = load_or_create_signing_key(cfg.signing_key_path)
        self.ctx.signing_key = key
        if cfg.public_dir is not None:  # what peers need, apart from the state dir that holds the private keys
            cfg.public_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.insecure:
                shutil.copyfile(cfg.tls_cert_path, cfg.public_dir / "tls_cert.pem")
            write_public_key(key, cfg.public_dir / "public_key.pem")
        write_public_key(key, cfg.public_key_path)
        if cfg.dht:
            from coordinator.dht_node import start_dht, visible_maddrs
            from coordinator.roster import RosterPublisher

            self.dht, subkey = start_dht(cfg)
            self.ctx.dht_initial_peers = visible_maddrs(self.dht)
            roster = RosterPublisher(self.ctx, key, self.dht, subkey)
            self._threads.append(Periodic("coordinator-roster", cfg.roster_interval_s, roster.publish_once))
        self._threads.append(
            Periodic("coordinator-finalize", cfg.finalize_poll_s, lambda: finalize_step(self.ctx, key))
        )

    def start(self) -> CoordinatorServer:
        try:
            self._start()
        except BaseException:
            self.stop(grace=0)
            raise
        log.info("coordinator serving gRPC on %s, metrics on %s", self.address, self.metrics_url or "(off)")
        return self

    def _start(self) -> None:
        cfg = self.config
        if not cfg.insecure:  # before the public key appears: whoever waits for that finds the certificate too
            ensure_certificate(cfg.tls_cert_path, cfg.tls_key_path, (cfg.host, *cfg.tls_hostnames))
        self._open_configured_round()
        self._start_background()
        limit = cfg.max_message_bytes
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="coordinator-rpc"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),  # a second coordinator on the same port must fail, not share it
                ("grpc.max_connection_idle_ms", 300_000),
                ("grpc.http2.max_pings_without_data", 0),
            ],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers((CoordinatorServicer(self.ctx).generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self._grpc = server
        try:
            if cfg.insecure:
                log.warning("gRPC in plaintext (--insecure): credentials and join tokens travel in clear")
                self.port = server.add_insecure_port(_hostport(cfg.host, cfg.port))
            else:
                creds = server_credentials(cfg.tls_cert_path, cfg.tls_key_path)
                self.port = server.add_secure_port(_hostport(cfg.host, cfg.port), creds)
        except RuntimeError as e:
            raise OSError(f"cannot listen for gRPC on {_hostport(cfg.host, cfg.port)}: {e}") from e
        server.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._serving = True
        if cfg.metrics_port is not None:
            register_round_metrics(self.ctx)
            routes, prefix_routes = status_routes(self.ctx)  # the status page: /, /api/status, /adapters/...
            self._http = StatusHttpServer(cfg.host, cfg.metrics_port, self.ctx.metrics.registry, lambda: self._serving,
                                          routes=routes, prefix_routes=prefix_routes, threads=cfg.http_threads,
                                          timeout_s=cfg.http_timeout_s)  # fmt: skip
            self.metrics_port = self._http.start().port
        self._sweeper.start()
        for thread in self._threads:
            thread.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop answering (health NOT_SERVING first), let in-flight RPCs finish, close the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._serving = False
        self._health.enter_graceful_shutdown()
        self._sweeper.stop()
        for thread in self._threads:
            thread.stop()
        if self._grpc is not None:
            self._grpc.stop(self.config.stop_grace_s if grace is None else grace).wait()
            self._grpc = None
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        with self.ctx.lock:
            self.ctx.store.close()

    def __enter__(self) -> CoordinatorServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve(config: CoordinatorConfig, *, clock: Callable[[], float] = time.time) -> CoordinatorServer:
    """Start a coordinator and return it running; ``.address``, ``.port``, ``.metrics_port`` say where."""
    return CoordinatorServer(config, clock=clock).start()
