"""The frontend's HTTP endpoint on `ops.metrics_port`: Prometheus `/metrics`, and the
probes of balancers and orchestrators that cannot speak grpc.health.v1:

- `GET /healthz`: 200 while the process is up (start-up and drain included);
- `GET /readyz`: 200 only while the frontend serves (every gpu_worker and a compositor
  alive, no preloaded model failed, not draining), else 503 with the reason; it turns
  503 the moment SIGTERM arrives, before the drain, so a balancer stops sending new work
  while in-flight work finishes.

It runs on its own threads (as prometheus_client's own server does), so a probe is
answered even while the event loop is busy and never adds work to it; every other path
is prometheus_client's WSGI app, as with `start_http_server` before. A thread and a
descriptor per connection is cheap only while connections end: one that has not been
answered within REQUEST_DEADLINE_S (a client that sends nothing, or a byte at a time, or
does not read its answer) is shut down, and beyond MAX_CONNECTIONS new ones are closed at
once.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)

# None when ready, else why not (shown in the 503's body)
NotReadyReason = Callable[[], str | None]

REQUEST_DEADLINE_S = 10.0  # a probe or a scrape takes milliseconds
MAX_CONNECTIONS = 64       # a balancer or two and a scraper need a handful


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per connection, each connection cut off at its deadline (checked by the
    serving loop, which wakes every poll interval), at most `max_connections` at once."""

    daemon_threads = True  # a slow scraper never holds up the process's exit
    request_queue_size = MAX_CONNECTIONS  # accepted in the order they came (the default: 5)
    request_deadline_s = REQUEST_DEADLINE_S
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: dict[socket.socket, float] = {}  # connection -> when it came
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            if len(self._open) >= self.max_connections:
                full = True
            else:
                full = False
                self._open[request] = time.monotonic()
        if full:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Shut down the connections past their deadline: a read or a write blocked on one
        returns at once, and its thread ends."""
        now = time.monotonic()
        with self._open_lock:
            late = [s for s, came in self._open.items() if now - came > self.request_deadline_s]
        for sock in late:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed meanwhile
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection cut off or reset mid-request: one debug line, not a traceback."""
        log.debug("ops http: connection from %s ended mid-request", client_address)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A balancer probes every 500 ms: one log line per probe would drown the log."""


class OpsHttpServer:
    """One small HTTP server for /metrics, /healthz and /readyz; `close()` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]

    @classmethod
    def create(cls, host: str, port: int, registry: CollectorRegistry,
               not_ready: NotReadyReason, request_deadline_s: float = REQUEST_DEADLINE_S,
               max_connections: int = MAX_CONNECTIONS) -> OpsHttpServer:
        """Bind `host:port` (0: any free port) and serve on a daemon thread; a port that is
        taken raises OSError, which stops the start with its reason."""
        metrics = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                return _text(start_response, "200 OK", "ok\n")
            if path == "/readyz":
                reason = not_ready()
                if reason is None:
                    return _text(start_response, "200 OK", "ready\n")
                return _text(start_response, "503 Service Unavailable", f"not ready: {reason}\n")
            return metrics(environ, start_response)

        server_class = type("OpsWSGIServer", (_ThreadingWSGIServer,),
                            {"address_family": _family(host, port),
                             "request_deadline_s": request_deadline_s,
                             "max_connections": max_connections})
        server: WSGIServer = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="ops-http", daemon=True)
        thread.start()
        log.info("metrics and probes on http://%s:%d (/metrics, /healthz, /readyz)",
                 host, server.server_address[1])
        return cls(server, thread)

    def close(self) -> None:
        """Stop answering (idempotent); the port is free when this returns."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()


def _text(start_response: Callable[..., Any], status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(data))), ("Cache-Control", "no-store")])
    return [data]


def _family(host: str, port: int) -> socket.AddressFamily:
    """IPv6 for an IPv6 host ("::"), else IPv4: WSGIServer binds AF_INET only by default."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return info[0][0]
