"""One small HTTP server thread for every daemon: ``/metrics``, ``/health`` and a few extra routes.

The coordinator (``coordinator.status_http``) and the peer (``peer.metrics.MetricsServer``) both use
:class:`HttpServerThread`. Routes are plain functions from a :class:`Request` to a :class:`Response`;
``/metrics`` is prometheus-client's own WSGI app (content negotiation, gzip). Only GET and HEAD are
served. Requests run on daemon threads, so a slow client never blocks a scrape.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

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


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


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
    ) -> None:
        self._metrics_app: WsgiApp | None = make_wsgi_app(registry) if registry is not None else None
        self._routes = dict(routes or {})
        self._prefixes = sorted((prefix_routes or {}).items(), key=lambda kv: -len(kv[0]))
        self._fallback = fallback or self._not_found
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        try:
            self._httpd = make_server(host, port, self._app, server_class=server_class, handler_class=_QuietHandler)
        except OSError as e:
            raise OSError(f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}") from e
        self.host = host
        self.port: int = int(self._httpd.server_port)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
        )

    @property
    def paths(self) -> list[str]:
        """The paths this server answers (prefixes end with ``/``)."""
        known = (["/metrics"] if self._metrics_app else []) + list(self._routes) + [p for p, _ in self._prefixes]
        return sorted(known)

    def start(self) -> HttpServerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(5.0)
        self._httpd.server_close()

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
