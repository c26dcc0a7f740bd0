"""The frontend's client of the worker tier: its ZeroMQ sockets, sends to gpu_workers,
control calls (LoadModel / UnloadModel) and the one inbox every other role writes to.

Inbox messages go to a `{message type: handler}` table given at start; the handlers run
on the frontend's event loop.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from pipeline import messages as msg
from pipeline.config import Config
from pipeline.runtime.addresses import Addresses
from pipeline.runtime.sockets import make_socket

log = logging.getLogger(__name__)

Handler = Callable[[msg.Message, list[bytes]], None]


@dataclass
class _Control:
    future: asyncio.Future[msg.ControlReply]
    worker: int


class WorkerClient:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.addresses = Addresses.of(cfg)
        self._ctx = zmq.asyncio.Context()
        self._inbox = make_socket(self._ctx, zmq.PULL, bind=self.addresses.frontend_inbox)
        self._to_workers = [make_socket(self._ctx, zmq.PUSH,
                                        connect=[self.addresses.worker_inbox(i)])
                            for i in range(cfg.gpus.count)]
        self._nonblocking: list[zmq.Socket[bytes]] = [zmq.Socket.shadow(s.underlying)
                                                      for s in self._to_workers]
        self._ids = itertools.count((os.getpid() & 0xFFFFFF) << 32)
        self._controls: dict[int, _Control] = {}
        self._reading: int | None = None  # the inbox's file descriptor, while read

    def next_id(self) -> int:
        """A request id unique to this frontend (its pid in the high bits)."""
        return next(self._ids)

    def start(self, handlers: dict[type, Handler]) -> None:
        """Read the inbox from now on, each message to its type's handler: the loop watches
        the socket's descriptor itself (no future per wake-up, as zmq.asyncio would make:
        a request's frames arrive one message each)."""
        table = {**handlers, msg.ControlReply: self._on_control_reply}
        inbox: zmq.Socket[bytes] = zmq.Socket.shadow(self._inbox.underlying)
        fd = self._reading = int(inbox.getsockopt(zmq.FD))
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, self._read_inbox, inbox, table)
        loop.call_soon(self._read_inbox, inbox, table)  # what came before we watched

    async def send(self, worker: int, message: bytes) -> None:
        """To a gpu_worker: at once when its queue has room (no future), else waiting."""
        try:
            self._nonblocking[worker].send(message, zmq.NOBLOCK)
        except zmq.Again:
            await self._to_workers[worker].send(message)

    async def control(self, worker: int, worker_pid: int, kind: type, model_id: str,
                      timeout: float) -> msg.ControlReply:
        """Send LoadModel/UnloadModel to `worker` and wait for its reply."""
        request_id = self.next_id()
        future: asyncio.Future[msg.ControlReply] = asyncio.get_running_loop().create_future()
        self._controls[request_id] = _Control(future, worker)
        try:
            await self.send(worker, msg.encode(kind(request_id, worker_pid, model_id)))
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._controls.pop(request_id, None)

    def fail_controls(self, worker: int, error: Exception) -> None:
        """The worker is gone: its control calls fail now."""
        for control in self._controls.values():
            if control.worker == worker and not control.future.done():
                control.future.set_exception(error)

    def _on_control_reply(self, m: msg.Message, _: list[bytes]) -> None:
        assert isinstance(m, msg.ControlReply)
        control = self._controls.get(m.request_id)
        if control is not None and not control.future.done():
            control.future.set_result(m)

    def _read_inbox(self, inbox: zmq.Socket[bytes], table: dict[type, Handler]) -> None:
        # ZeroMQ's descriptor says "something changed", not "readable": every message that is
        # there is taken while EVENTS says POLLIN (it signals again only once drained)
        while int(inbox.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            frames = inbox.recv_multipart(zmq.NOBLOCK)
            try:
                message = msg.frontend_decoder.decode(frames[0])
                table[type(message)](message, frames[1:])
            except Exception:
                log.exception("dropped a message from the inbox")

    async def close(self) -> None:
        if self._reading is not None:
            asyncio.get_running_loop().remove_reader(self._reading)
            self._reading = None
        for sock in [self._inbox, *self._to_workers]:
            sock.close(0)
        self._ctx.term()
