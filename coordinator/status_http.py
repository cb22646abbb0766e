"""The coordinator's HTTP thread: ``/metrics`` (its own registry), ``/health`` and the status page routes."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry

from swarm.http import HttpServerThread, Request, Response, Route


class StatusHttpServer:
    """``/metrics`` in Prometheus text format; ``/health`` is 200 while ``healthy()`` is true, else 503.

    ``routes`` / ``prefix_routes`` add pages (the status page, its JSON and adapter downloads).
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        *,
        routes: Mapping[str, Route] | None = None,
        prefix_routes: Mapping[str, Route] | None = None,
        threads: int = 4,
        timeout_s: float = 10.0,
    ) -> None:
        def health(_: Request) -> Response:
            ok = healthy()
            return Response.text("ok\n" if ok else "not serving\n", 200 if ok else 503)

        self._http = HttpServerThread(
            host, port, registry=registry, routes={"/health": health, **(routes or {})},
            prefix_routes=prefix_routes, name="coordinator-http", threads=threads, timeout_s=timeout_s,
        )  # fmt: skip
        self.port: int = self._http.port

    def start(self) -> StatusHttpServer:
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()
