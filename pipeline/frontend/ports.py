"""The frontend's listening ports, bound before anything else starts.

grpcio sets SO_REUSEPORT by default, so a second server on a taken gRPC port used to
start "fine" and steal a share of the traffic. Every port is bound without it, first
thing, and a taken one stops the start at once with a message naming the port and the
setting or flag that moves it.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.runtime.process import RoleError


class PortTaken(RoleError):
    """A port the frontend needs is in use."""


@dataclass(frozen=True)
class Listener:
    what: str       # "gRPC", "WebSocket", "metrics"
    host: str
    port: int
    setting: str    # the config key
    flag: str       # the `lipsync serve` option

    def taken(self, reason: object) -> PortTaken:
        return PortTaken(f"{self.what} port {self.port} on {self.host} is in use ({reason}); "
                         f"stop what holds it, or choose another with {self.setting} in the "
                         f"config or `lipsync serve {self.flag} N`")


def listeners(cfg: Config) -> list[Listener]:
    ports = [Listener("gRPC", cfg.server.host, cfg.server.port, "server.port", "--grpc-port"),
             Listener("WebSocket", cfg.server.host, cfg.server.ws_port, "server.ws_port",
                      "--ws-port")]
    if cfg.ops.metrics_port:
        ports.append(Listener("metrics", cfg.ops.metrics_host, cfg.ops.metrics_port,
                              "ops.metrics_port (0 turns it off)", "--metrics-port"))
    return ports


def bind(listener: Listener) -> socket.socket:
    """A listening TCP socket on the listener's address (SO_REUSEADDR only, as every
    server sets it: a port in TIME_WAIT is free, one with a listener is not)."""
    try:
        infos = socket.getaddrinfo(listener.host or None, listener.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise listener.taken(exc) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise listener.taken(exc.strerror or exc) from None
    return sock


def check_free(cfg: Config) -> None:
    """PortTaken for the first configured port in use (for a start that fails at once,
    before any role is spawned; the frontend binds for real later)."""
    for listener in listeners(cfg):
        bind(listener).close()
