"""`lipsync lb-config`: print a complete HAProxy configuration for several boxes, each a
`lipsync serve` (or its systemd units), behind one balancer (docs/deploy.md, "Scale-out").

What it writes, and why:

- gRPC: an HTTP/2 cleartext (h2c) frontend; HAProxy balances every call (an h2 stream) on
  its own. A call with `x-model-id` goes to the backend that hashes that header with
  consistent hashing, so each avatar lives on one box and only a lost box's avatars move.
  A call without it (clients built from the seed's proto) goes to the least-connections
  backend: HAProxy's own fallback for a missing hash key would be round-robin.
- WebSocket `/audio`: the same split on the `model` URL parameter. Every backend lists
  the boxes in the same order with the same `id`s, so both protocols (and every balancer
  built from the same `--box` list) send one avatar to the same box.
- Readiness: one active check per box, `GET /readyz` on its metrics port every 500 ms,
  down after 2 failures (~1 s after SIGTERM); the other backends `track` it.
- A failed connection is retried on another box (`option redispatch 1`).
- Timeouts: 60 s requests (server.request_timeout_s) fit within `timeout server`; a
  WebSocket session lives under `timeout tunnel`. Buffers and the HTTP/2 window are sized
  for messages of megabytes.
- The log: `option httplog`'s line with the request's path, not its URI: a browser's
  WebSocket carries its token in the query string.
- The stats page, and HAProxy's own Prometheus exporter at its `/metrics`.
"""
from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from dataclasses import dataclass

PROG = "lipsync lb-config"
CHECK = "check port {metrics} check-proto h1 inter 500ms fastinter 250ms fall 2 rise 2"
# HAProxy's `option httplog` format with "%HM %HPO %HV" (method, path, version) for its
# quoted request line (%r), which would log the query string
HTTP_LOG_FORMAT = ('"%ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %CC %CS %tsc '
                   '%ac/%fc/%bc/%sc/%rc %sq/%bq %hr %hs \\"%HM %HPO %HV\\""')
# Everything written into the config is checked against these first: a newline or a `#`
# in an argument would add directives or comment out the rest of the line
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")  # a DNS name or an IPv4 address


class SpecError(ValueError):
    """A --box or listen address that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Box:
    host: str            # as HAProxy writes an address: IPv6 in brackets
    grpc_port: int
    ws_port: int
    metrics_port: int    # ops.metrics_port of that box: /readyz

    @property
    def name(self) -> str:
        return f"{self.host}:{self.grpc_port}"


def _port(text: str, what: str, spec: str) -> int:
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise SpecError(f"{spec!r}: {what} must be a port number 1-65535, got {text!r}")
    return int(text)


def _host(host: str, spec: str, wildcard: bool = False) -> str:
    """`host` when it is a DNS name, an IPv4 address, a bracketed IPv6 address (checked
    by _split_host) or, with `wildcard`, `*`."""
    if host.startswith("[") or (wildcard and host == "*") or _HOST.fullmatch(host):
        return host
    raise SpecError(f"{spec!r}: {host!r} is not a host name or address")


def _split_host(spec: str) -> tuple[str, list[str]]:
    """'[v6]:a:b' or 'host:a:b' -> (host, ['a', 'b'])."""
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep:
            raise SpecError(f"{spec!r}: an IPv6 address needs its closing ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SpecError(f"{spec!r}: {host!r} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise SpecError(f"{spec!r}: expected ':' after ']'")
        return f"[{host}]", rest[1:].split(":")
    host, *ports = spec.split(":")
    return host, ports


def parse_box(spec: str) -> Box:
    """HOST:GRPC_PORT:WS_PORT:METRICS_PORT (IPv6 as [::1]:...)."""
    host, ports = _split_host(spec)
    if len(ports) != 3:
        raise SpecError(f"{spec!r}: expected HOST:GRPC_PORT:WS_PORT:METRICS_PORT "
                        "(the box's server.port, server.ws_port and ops.metrics_port)")
    if not host:
        raise SpecError(f"{spec!r}: the host is empty")
    _host(host, spec)
    grpc_port = _port(ports[0], "GRPC_PORT", spec)
    ws_port = _port(ports[1], "WS_PORT", spec)
    metrics_port = _port(ports[2], "METRICS_PORT", spec)
    if len({grpc_port, ws_port, metrics_port}) != 3:
        raise SpecError(f"{spec!r}: the gRPC, WebSocket and metrics ports must differ")
    return Box(host, grpc_port, ws_port, metrics_port)


def parse_boxes(specs: list[str]) -> list[Box]:
    boxes = [parse_box(spec) for spec in specs]
    if not boxes:
        raise SpecError("at least one --box is needed")
    seen: set[tuple[str, int]] = set()
    for box in boxes:
        for port in (box.grpc_port, box.ws_port, box.metrics_port):
            if (box.host, port) in seen:
                raise SpecError(f"{box.host}:{port} is named twice in --box")
            seen.add((box.host, port))
    return boxes


def parse_listen(spec: str, default_host: str, what: str) -> tuple[str, int]:
    """[HOST:]PORT -> (host, port); HOST may be '*' or '[::]'."""
    if ":" not in spec:
        return default_host, _port(spec, what, spec)
    host, ports = _split_host(spec)
    if len(ports) != 1 or not host:
        raise SpecError(f"{spec!r}: {what} must be PORT or HOST:PORT")
    return _host(host, spec, wildcard=True), _port(ports[0], what, spec)


def _bind(address: tuple[str, int]) -> str:
    host, port = address
    return f"{'' if host == '*' else host}:{port}"


def haproxy_config(boxes: list[Box], listen_grpc: tuple[str, int], listen_ws: tuple[str, int],
                   stats: tuple[str, int] | None, request_timeout_s: float = 60.0) -> str:
    """The whole haproxy.cfg text."""
    server_timeout = int(request_timeout_s) + 15  # the box's own DEADLINE_EXCEEDED comes first
    limit = f"{request_timeout_s:g} s"
    lines = [
        "# HAProxy configuration written by `lipsync lb-config` (checked with HAProxy 2.6).",
        "# Boxes: " + ", ".join(f"box{i} {b.name}" for i, b in enumerate(boxes, 1)),
        "# Keep the box order: server ids decide which box each avatar hashes to.",
        "# Each box: ops.metrics_port reachable from here (ops.metrics_host), and",
        "# server.drain_delay_s >= 1.5 so a SIGTERM drains without a failed call.",
        "",
        "global",
        "    log stdout format raw local0 info",
        "    # maxconn: derived from the file-descriptor limit (systemd: LimitNOFILE=)",
        "    # MB-sized gRPC messages (a client-built batch of 8 is 9.8 MB) cross in few steps:",
        "    # through HAProxy on loopback +53 ms per such request with the defaults, +13 ms",
        "    tune.bufsize 65536",
        "    tune.h2.initial-window-size 8388608",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    # option httplog's line, with the path in place of the URI: a browser's WebSocket",
        "    # carries its token in the query (?token=), which must not reach the log",
        f"    log-format {HTTP_LOG_FORMAT}",
        "    option dontlognull",
        "    timeout connect 2s",
        f"    timeout client {server_timeout}s",
        f"    timeout server {server_timeout}s    # > the box's request timeout ({limit})",
        "    timeout http-request 10s",
        "    timeout queue 10s",
        "    timeout tunnel 1h       # a WebSocket session after its upgrade",
        "    timeout client-fin 5s",
        "    timeout check 1s",
        "    retries 2",
        "    option redispatch 1     # each retry of a failed connection tries another box",
        "",
        "frontend grpc",
        f"    bind {_bind(listen_grpc)} proto h2",
        "    use_backend grpc_by_model if { req.hdr(x-model-id) -m found }",
        "    default_backend grpc_least_conn",
        "",
        "backend grpc_by_model",
        "    balance hdr(x-model-id)",
        "    hash-type consistent",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
    ]
    lines += [f"    server box{i} {b.host}:{b.grpc_port} id {i} proto h2 "
              + CHECK.format(metrics=b.metrics_port) for i, b in enumerate(boxes, 1)]
    lines += ["", "backend grpc_least_conn", "    balance leastconn"]
    lines += [f"    server box{i} {b.host}:{b.grpc_port} id {i} proto h2 "
              f"track grpc_by_model/box{i}" for i, b in enumerate(boxes, 1)]
    lines += [
        "",
        "frontend websocket",
        f"    bind {_bind(listen_ws)}",
        "    use_backend ws_by_model if { url_param(model) -m found }",
        "    default_backend ws_least_conn",
        "",
        "backend ws_by_model",
        "    balance url_param model",
        "    hash-type consistent",
    ]
    lines += [f"    server box{i} {b.host}:{b.ws_port} id {i} track grpc_by_model/box{i}"
              for i, b in enumerate(boxes, 1)]
    lines += ["", "backend ws_least_conn", "    balance leastconn"]
    lines += [f"    server box{i} {b.host}:{b.ws_port} id {i} track grpc_by_model/box{i}"
              for i, b in enumerate(boxes, 1)]
    if stats is not None:
        lines += [
            "",
            "frontend stats",
            f"    bind {_bind(stats)}",
            "    stats enable",
            "    stats uri /",
            "    stats refresh 5s",
            "    http-request use-service prometheus-exporter if { path /metrics }",
        ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    try:
        boxes = parse_boxes(args.box or [])
        grpc_listen = parse_listen(args.listen_grpc, "*", "--listen-grpc")
        ws_listen = parse_listen(args.listen_ws, "*", "--listen-ws")
        stats = None if args.stats_port == "0" else parse_listen(args.stats_port, "127.0.0.1",
                                                                 "--stats-port")
    except SpecError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.request_timeout_s <= 86400:  # NaN too
        print(f"{PROG}: --request-timeout-s must be > 0 and at most 86400, got "
              f"{args.request_timeout_s:g}", file=sys.stderr)
        return 2
    sys.stdout.write(haproxy_config(boxes, grpc_listen, ws_listen, stats, args.request_timeout_s))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `lb-config` subcommand to the `lipsync` parser."""
    p = sub.add_parser("lb-config", help="print an HAProxy config for several boxes",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--listen-grpc", required=True, metavar="[HOST:]PORT",
                   help="where the balancer takes gRPC (h2c), e.g. 50053")
    p.add_argument("--listen-ws", required=True, metavar="[HOST:]PORT",
                   help="where the balancer takes WebSocket /audio, e.g. 8080")
    p.add_argument("--box", action="append", metavar="HOST:GRPC_PORT:WS_PORT:METRICS_PORT",
                   help="one box (repeat; keep the order when regenerating): its "
                        "server.port, server.ws_port and ops.metrics_port")
    p.add_argument("--stats-port", default="8404", metavar="[HOST:]PORT",
                   help="the stats page (default 127.0.0.1:8404; 0: none)")
    p.add_argument("--request-timeout-s", type=float, default=60.0, metavar="S",
                   help="the boxes' server.request_timeout_s (default 60)")
    p.set_defaults(func=run)
