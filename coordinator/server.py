"""Start a coordinator in-process: ``server = serve(CoordinatorConfig(port=0)); ...; server.stop()``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.config import CoordinatorConfig
from coordinator.context import CoordinatorContext
from coordinator.membership import Sweeper
from coordinator.rounds import RoundConflict, open_round
from coordinator.servicer import CoordinatorServicer
from coordinator.status_http import StatusHttpServer
from swarm.proto import SERVICE_NAME
from swarm.proto import coordinator_pb2_grpc as pb_grpc

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
        self._serving = False
        self._closed = False

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC service (for ``grpc.insecure_channel``)."""
        return _hostport(self.config.host, self.port)

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://{_hostport(self.config.host, self.metrics_port)}/metrics"

    def _open_configured_round(self) -> None:
        spec = self.config.round_spec
        if spec is None:
            return
        active = self.ctx.store.active_round()
        if active is not None:
            if active.round_id != spec.round_id:
                log.warning("round %s is %s; round spec %s waits until it ends", active.round_id,
                            active.state.value, spec.round_id)  # fmt: skip
            return
        try:
            open_round(self.ctx.store, spec, self.ctx.clock())
        except RoundConflict as e:  # e.g. restarted with the spec of a round that already ended
            log.warning("not opening the configured round: %s", e)

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
        self._open_configured_round()
        limit = cfg.max_message_bytes
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="coordinator-rpc"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),  # a second coordinator on the same port must fail, not share it
            ],
        )
        pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(self.ctx), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self._grpc = server
        try:
            self.port = server.add_insecure_port(_hostport(cfg.host, cfg.port))
        except RuntimeError as e:
            raise OSError(f"cannot listen for gRPC on {_hostport(cfg.host, cfg.port)}: {e}") from e
        server.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._serving = True
        if cfg.metrics_port is not None:
            self._http = StatusHttpServer(cfg.host, cfg.metrics_port, self.ctx.metrics.registry, lambda: self._serving)
            self.metrics_port = self._http.start().port
        self._sweeper.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop answering (health NOT_SERVING first), let in-flight RPCs finish, close the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._serving = False
        self._health.enter_graceful_shutdown()
        self._sweeper.stop()
        if self._grpc is not None:
            self._grpc.stop(self.config.stop_grace_s if grace is None else grace).wait()
            self._grpc = None
        if self._http is not None:
            self._http.stop()
            self._http = None
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
