"""One small HTTP server thread for every daemon: ``/metrics``, ``/health`` and a few extra routes.

The coordinator (``coordinator.status_http``) and the peer (``peer.metrics.MetricsServer``) both use
:class:`HttpServerThread`. Routes are plain functions from a :class:`Request` to a :class:`Response`;
``/metrics`` is prometheus-client's own WSGI app (content negotiation, gzip). Only GET and HEAD are
served. The server is waitress: HTTP parsing (a malformed request gets a 400), a bounded pool of
worker threads, a bounded number of connections, and a timeout after which idle or slow connections
are closed, so a slow client never blocks a scrape and a flood cannot exhaust threads or memory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, make_wsgi_app
from waitress.server import create_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


@dataclass(frozen=True)
class Request:
    """What a route sees: the decoded path (no query), the query parameters and the raw WSGI environ."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    environ: Mapping[str, Any]


@dataclass(frozen=True)
class Response:
    """A route's answer; ``body`` may be bytes or an iterable of chunks (streamed, e.g. a file)."""

    status: int = 200
    body: bytes | Iterable[bytes] = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def text(cls, text: str, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        return cls(status, text.encode(), "text/plain; charset=utf-8", headers)

    @classmethod
    def html(cls, text: str, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        return cls(status, text.encode(), "text/html; charset=utf-8", headers)

    @classmethod
    def json(cls, text: str, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        return cls(status, text.encode(), "application/json", headers)


Route = Callable[[Request], Response]


class HttpServerThread:
    """Bind ``host:port`` now (port 0 = ephemeral, see :attr:`port`); serve from a daemon thread after :meth:`start`.

    ``routes`` maps exact paths to routes; ``prefix_routes`` maps path prefixes (e.g. ``/adapters/``)
    to routes that read the rest of ``request.path``. With ``registry``, ``/metrics`` serves it.
    ``fallback`` answers every other path (default: 404 naming the known paths).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry | None = None,
        routes: Mapping[str, Route] | None = None,
        prefix_routes: Mapping[str, Route] | None = None,
        fallback: Route | None = None,
        name: str = "http",
        threads: int = 4,
        timeout_s: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self._metrics_app: WsgiApp | None = make_wsgi_app(registry) if registry is not None else None
        self._routes = dict(routes or {})
        self._prefixes = sorted((prefix_routes or {}).items(), key=lambda kv: -len(kv[0]))
        self._fallback = fallback or self._not_found
        listen = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        try:
            self._httpd: Any = create_server(
                self._app, listen=listen, threads=threads, channel_timeout=timeout_s,
                cleanup_interval=max(1, int(timeout_s / 2)), connection_limit=max_connections,
                max_request_header_size=16 * 1024, max_request_body_size=64 * 1024, ident="loraswarm",
                asyncore_loop_timeout=1, clear_untrusted_proxy_headers=True,
            )  # fmt: skip
        except OSError as e:
            raise OSError(f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}") from e
        self.host = host
        self.port: int = int(self._httpd.effective_port)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._httpd.run()
        except Exception:  # the loop ends with an error when stop() closes its sockets under it
            if not self._stopped:
                logging.getLogger(__name__).exception("HTTP server loop failed")

    @property
    def paths(self) -> list[str]:
        """The paths this server answers (prefixes end with ``/``)."""
        known = (["/metrics"] if self._metrics_app else []) + list(self._routes) + [p for p, _ in self._prefixes]
        return sorted(known)

    def start(self) -> HttpServerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every connection and the listening socket (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        for channel in list(self._httpd._map.values()):  # close every socket of waitress' loop; it then ends
            channel.close()
        self._httpd.task_dispatcher.shutdown()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _not_found(self, request: Request) -> Response:
        return Response.text(f"not found: {request.path[:200]}; this server answers {', '.join(self.paths)}\n", 404)

    def _route(self, path: str) -> Route | None:
        if path in self._routes:
            return self._routes[path]
        for prefix, route in self._prefixes:
            if path.startswith(prefix):
                return route
        return None

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return self._send(Response.text(f"method {method[:20]} not allowed: use GET\n", 405), start_response,
                              extra=(("Allow", "GET, HEAD"),))  # fmt: skip
        if path == "/metrics" and self._metrics_app is not None and "/metrics" not in self._routes:
            body = self._metrics_app({**environ, "REQUEST_METHOD": "GET"}, start_response)  # HEAD: body dropped below
        else:
            route = self._route(path) or self._fallback
            body = self._send(route(Request(method, path, parse_qs(environ.get("QUERY_STRING", "")), environ)),
                              start_response)  # fmt: skip
        if method == "HEAD":
            _close(body)
            return []
        return body

    @staticmethod
    def _send(
        response: Response, start_response: Callable[..., Any], extra: tuple[tuple[str, str], ...] = ()
    ) -> Iterable[bytes]:
        status = f"{response.status} {_REASONS.get(response.status, 'Status')}"
        headers = [("Content-Type", response.content_type), *response.headers, *extra]
        if isinstance(response.body, bytes):
            headers.append(("Content-Length", str(len(response.body))))
            start_response(status, headers)
            return [response.body]
        start_response(status, headers)
        return response.body


def _close(body: bytes | Iterable[bytes]) -> None:
    close = getattr(body, "close", None)
    if callable(close):
        close()


def file_chunks(path: str, chunk_bytes: int = 1 << 16) -> Iterator[bytes]:
    """Stream a file in chunks (the file is closed when the iterator is exhausted or closed)."""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            yield chunk
