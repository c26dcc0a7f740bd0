"""The one factory for ZeroMQ sockets: every option (HWM, linger, timeouts) is set here."""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import zmq

S = TypeVar("S", bound=zmq.Socket)

# Backpressure comes from the frontend's admission control, not from ZMQ blocking:
# high-water marks are far above any admitted load, sends to a missing peer time out.
HWM = 100_000
SEND_TIMEOUT_MS = 2_000


def make_socket(ctx: zmq.Context[S], kind: int, *, bind: str | None = None,
                connect: list[str] | tuple[str, ...] = (), subscribe: bytes | None = None) -> S:
    """A socket with the project's options, bound and/or connected."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, subscribe or b"")
    if kind == zmq.ROUTER:
        # a message for a peer that is gone fails (EHOSTUNREACH) instead of vanishing, so
        # its sender can give the work to another peer
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if bind is not None:
        if bind.startswith("ipc://"):
            Path(bind[len("ipc://"):]).parent.mkdir(parents=True, exist_ok=True)
        sock.bind(bind)
    for endpoint in connect:
        sock.connect(endpoint)
    return sock
