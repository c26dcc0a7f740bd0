"""The frontend's bridge to the other roles: admission, shared-memory blocks, routing to
gpu_workers, collecting JPEGs, and the registry view every RPC answers from.

Everything here runs on the frontend's one asyncio loop, so the state below needs no
locks. Each request owns one arena block from admission until it is answered (or, if
it timed out, until its worker has let go of it or died).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from pipeline import messages as msg
from pipeline.runtime.addresses import Addresses
from pipeline.config import Config
from pipeline.frontend.validation import ValidRequest, copy_finite_visual
from pipeline.runtime.logs import request_id as log_request
from pipeline.shm.arena import Arena, Block
from pipeline.synctalk import PREDICTION_BYTES, PREDICTION_SHAPE, VISUAL_BYTES, VISUAL_SHAPE
from pipeline.runtime.sockets import make_socket

log = logging.getLogger(__name__)

FLOAT = 4
LIVENESS_BEATS = 3  # a role silent this many heartbeats is dead: its requests fail in < 2 s


ARENA_SPACE_WAIT_S = 10.0


def create_arena(name: str, size: int) -> Arena:
    """The request arena. /dev/shm may be short for a moment after a frontend died: its
    arena is unlinked but mapped by the other roles until they notice (within a heartbeat),
    so the space is waited for briefly before giving up."""
    deadline = time.monotonic() + ARENA_SPACE_WAIT_S
    waiting = False
    while True:
        try:
            return Arena.create(name, size)
        except MemoryError as exc:
            if time.monotonic() > deadline:
                raise
            if not waiting:
                log.warning("%s; waiting up to %.0f s for the other roles to let go of a dead "
                            "frontend's arena", exc, ARENA_SPACE_WAIT_S)
                waiting = True
            time.sleep(0.25)


class Unavailable(Exception):
    """The request could not be served for a reason of the server's (gRPC UNAVAILABLE)."""


class Overloaded(Exception):
    """Admission refused (gRPC RESOURCE_EXHAUSTED)."""


class Failed(Exception):
    """The pipeline rejected the request; str() is the client-facing error (success=false)."""


@dataclass
class InferResult:
    frames: list[bytes]
    done: msg.InferDone
    composite_ns: int          # wall time from the jobs' dispatch to the last JPEG here
    paste_ns: int              # summed over the frames, in the compositors
    jpeg_ns: int
    critical_ns: int           # paste + JPEG of the busiest compositor
    input_copy_ns: int         # the request's tensors into shared memory


@dataclass
class Pending:
    """One admitted InferBatchComposite request on its way through the pipeline."""

    request_id: int
    model_id: str
    worker: int
    block: Block
    frames: list[bytes | None]
    future: asyncio.Future[InferResult]
    done: msg.InferDone | None = None
    received: int = 0
    paste_ns: int = 0
    jpeg_ns: int = 0
    input_copy_ns: int = 0
    abandoned: bool = False  # the client gave up; the block waits for the worker
    per_compositor_ns: dict[int, int] = field(default_factory=dict)

    def frame_done(self, m: msg.FrameDone, jpeg: bytes) -> None:
        self.frames[m.frame_index] = jpeg
        self.received += 1
        self.paste_ns += m.paste_ns
        self.jpeg_ns += m.jpeg_ns
        busy = self.per_compositor_ns.get(m.compositor, 0)
        self.per_compositor_ns[m.compositor] = busy + m.paste_ns + m.jpeg_ns

    def complete_if_ready(self) -> bool:
        if self.done is None or self.received < len(self.frames):
            return False
        if not self.future.done():
            ns = max(0, time.monotonic_ns() - self.done.composite_start_ns)
            self.future.set_result(InferResult(
                list(self.frames), self.done, ns, self.paste_ns, self.jpeg_ns,  # type: ignore[arg-type]
                max(self.per_compositor_ns.values(), default=0), self.input_copy_ns))
        return True


@dataclass
class RoleView:
    """Liveness of one gpu_worker or compositor, from its heartbeats."""

    pid: int = 0
    last_seen: float = 0.0
    silent: bool = False      # missed its heartbeats; its requests were failed
    restarts: int = 0         # pid changes seen
    device_memory_used_bytes: int = 0
    queue_depth: int = 0
    models: dict[str, int] = field(default_factory=dict)  # what it reports holding
    jobs: dict[str, object] = field(default_factory=dict)  # a gpu_worker's compositor jobs

    def alive(self, now: float, heartbeat_s: float) -> bool:
        return self.pid != 0 and now - self.last_seen < LIVENESS_BEATS * heartbeat_s


@dataclass
class Control:
    future: asyncio.Future[msg.ControlReply]
    worker: int


class Dispatcher:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.addresses = Addresses.of(cfg)
        self.ctx = zmq.asyncio.Context()
        self.inbox = make_socket(self.ctx, zmq.PULL, bind=self.addresses.frontend_inbox)
        self.to_workers = [make_socket(self.ctx, zmq.PUSH, connect=[self.addresses.worker_inbox(i)])
                           for i in range(cfg.gpus.count)]
        self._worker_sockets = [zmq.Socket.shadow(s.underlying) for s in self.to_workers]
        self.arena = create_arena(self.addresses.request_arena(), cfg.runtime.arena_mb * 2**20)
        self.pending: dict[int, Pending] = {}
        self.controls: dict[int, Control] = {}
        self.workers = [RoleView() for _ in range(cfg.gpus.count)]
        self.compositors: dict[int, RoleView] = {}
        self._ids = itertools.count((os.getpid() & 0xFFFFFF) << 32)
        self._space_freed = asyncio.Event()
        self.on_worker_restart: Callable[[int], None] = lambda index: None
        self.on_worker_report: Callable[[int, dict[str, int]], None] = lambda index, models: None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read_inbox()),
                       asyncio.create_task(self._watch_liveness())]

    async def wait_for_roles(self, timeout: float) -> None:
        """Until every gpu_worker and compositor has been heard from."""
        deadline = time.monotonic() + timeout
        while not self.all_roles_alive():
            if time.monotonic() > deadline:
                raise TimeoutError("not every role reported in: workers "
                                   f"{[w.pid for w in self.workers]}, compositors "
                                   f"{sorted(self.compositors)}")
            await asyncio.sleep(0.05)

    def all_roles_alive(self) -> bool:
        now, hb = time.monotonic(), self.cfg.runtime.heartbeat_s
        alive_compositors = sum(c.alive(now, hb) for c in self.compositors.values())
        return (all(w.alive(now, hb) for w in self.workers)
                and alive_compositors >= self.cfg.compositor.pool_size)

    def healthy(self) -> bool:
        now, hb = time.monotonic(), self.cfg.runtime.heartbeat_s
        return (all(w.alive(now, hb) for w in self.workers)
                and any(c.alive(now, hb) for c in self.compositors.values()))

    # ---- inference -------------------------------------------------------------------

    async def run(self, worker: int, req: ValidRequest, deadline: float) -> InferResult:
        """Run one request on `worker`: its tensors into the arena, frames back in order."""
        b = req.batch_size
        audio_len = 0 if req.audio is None else req.audio.nbytes
        feature_len = 0 if req.features is None else req.features.nbytes
        size = b * (VISUAL_BYTES + PREDICTION_BYTES) + audio_len + feature_len
        if size > self.arena.capacity:
            raise Overloaded(f"request needs {size} bytes of shared memory; the arena has "
                             f"{self.arena.capacity} (runtime.arena_mb)")
        block = await self._allocate(size, deadline)
        pending: Pending | None = None
        refs = self._layout(block, b, audio_len, feature_len)
        if req.visual is None:  # audio alone: a copy of microseconds, done right here
            write = asyncio.get_running_loop().create_future()
            write.set_result(self._write_inputs(req, refs))
        else:  # megabytes: in a thread (numpy lets go of the GIL), the loop serves others
            write = asyncio.ensure_future(asyncio.to_thread(self._write_inputs, req, refs))
        try:
            copy_ns = await asyncio.shield(write)
            self._check_alive(worker)
            request_id = next(self._ids)
            log_request.set(f"{request_id:x}")
            pending = Pending(request_id, req.model_id, worker, block, [None] * b,
                              asyncio.get_running_loop().create_future(), input_copy_ns=copy_ns)
            self.pending[request_id] = pending
            await self._send(worker, msg.encode(msg.InferRequest(
                request_id=request_id, worker_pid=self.workers[worker].pid,
                model_id=req.model_id, batch_size=b, start_frame_idx=req.start_frame_idx,
                output=refs["output"], visual=refs["visual"], build_visual=req.visual is None,
                audio=refs.get("audio"), sample_rate=req.sample_rate,
                features=refs.get("features"), stream_offset=req.stream_offset,
                sent_ns=time.monotonic_ns())))
            async with asyncio.timeout(deadline - time.monotonic()):
                return await asyncio.shield(pending.future)
        except (TimeoutError, asyncio.CancelledError):
            if pending is not None and pending.done is None:
                # the worker may still write into the block: it is released when the
                # worker reports this request finished, or is found dead
                pending.abandoned = True
            raise
        finally:
            if pending is None and not write.done():
                # cancelled mid-copy: the copying thread still writes into the block
                write.add_done_callback(lambda _: self._release(block))
            elif pending is None:
                self._release(block)
            elif not pending.abandoned:
                self._finish(pending)

    async def _allocate(self, size: int, deadline: float) -> Block:
        """A block of the arena; waits (bounded by the deadline) while others hold it."""
        while (block := self.arena.allocate(size)) is None:
            self._space_freed.clear()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self._space_freed.wait()
            except TimeoutError:
                raise Overloaded("server busy: no shared memory freed before the deadline") from None
        return block

    def _release(self, block: Block) -> None:
        self.arena.release(block)
        self._space_freed.set()

    def _finish(self, pending: Pending) -> None:
        if self.pending.pop(pending.request_id, None) is not None:
            self._release(pending.block)

    def _layout(self, block: Block, b: int, audio_len: int, feature_len: int) -> dict[str, msg.TensorRef]:
        offset = block.offset
        refs = {}
        for name, shape, nbytes in (("visual", (b, *VISUAL_SHAPE), b * VISUAL_BYTES),
                                    ("output", (b, *PREDICTION_SHAPE), b * PREDICTION_BYTES),
                                    ("audio", (audio_len // FLOAT,), audio_len),
                                    ("features", (feature_len // FLOAT,), feature_len)):
            if nbytes or name in ("visual", "output"):
                refs[name] = msg.TensorRef(block.segment, offset, shape, "float32")
            offset += nbytes
        return refs

    def _write_inputs(self, req: ValidRequest, refs: dict[str, msg.TensorRef]) -> int:
        """The one copy of the request's tensors: received message -> shared memory (ns)."""
        t0 = time.perf_counter_ns()
        for name, source in (("visual", req.visual), ("audio", req.audio),
                             ("features", req.features)):
            if source is not None:
                ref = refs[name]
                target = self.arena.ndarray(ref.offset, ref.shape, "float32")
                if name == "visual":
                    copy_finite_visual(source, target)
                else:
                    target[...] = source.reshape(ref.shape)
        return time.perf_counter_ns() - t0

    async def _send(self, worker: int, message: bytes) -> None:
        """To a gpu_worker: at once when its queue has room (no future), else waiting."""
        try:
            self._worker_sockets[worker].send(message, zmq.NOBLOCK)
        except zmq.Again:
            await self.to_workers[worker].send(message)

    # ---- control -----------------------------------------------------------------------

    def _check_alive(self, worker: int) -> None:
        """Unavailable when the worker is not there to take work."""
        w = self.workers[worker]
        if not w.alive(time.monotonic(), self.cfg.runtime.heartbeat_s):
            raise Unavailable(f"gpu_worker {worker} is unavailable (restarting or not answering)")

    async def control(self, worker: int, kind: type, model_id: str) -> msg.ControlReply:
        self._check_alive(worker)
        request_id = next(self._ids)
        future: asyncio.Future[msg.ControlReply] = asyncio.get_running_loop().create_future()
        self.controls[request_id] = Control(future, worker)
        try:
            await self._send(worker, msg.encode(kind(request_id, self.workers[worker].pid,
                                                     model_id)))
            async with asyncio.timeout(self.cfg.runtime.start_timeout_s):
                return await future
        finally:
            self.controls.pop(request_id, None)

    # ---- the inbox -------------------------------------------------------------------

    async def _read_inbox(self) -> None:
        # one wake-up of the loop takes every message that is there (frames of a batch
        # arrive together): per message, a non-blocking read instead of a future
        inbox = zmq.Socket.shadow(self.inbox.underlying)
        while True:
            await self.inbox.poll(flags=zmq.POLLIN)
            while True:
                try:
                    frames = inbox.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    self._handle(msg.frontend_decoder.decode(frames[0]), frames[1:])
                except Exception:
                    log.exception("dropped a message from the inbox")

    def _handle(self, m: msg.Message, rest: list[bytes]) -> None:
        if isinstance(m, msg.FrameDone):
            p = self.pending.get(m.request_id)
            if p is not None and 0 <= m.frame_index < len(p.frames) and p.frames[m.frame_index] is None:
                p.frame_done(m, rest[0])
                p.complete_if_ready()
        elif isinstance(m, msg.InferDone):
            p = self.pending.get(m.request_id)
            if p is not None:
                p.done = m
                if p.abandoned:
                    self._finish(p)
                else:
                    p.complete_if_ready()
        elif isinstance(m, (msg.InferFailed, msg.FrameFailed)):
            p = self.pending.get(m.request_id)
            if isinstance(m, msg.FrameFailed) and p is not None and \
                    0 <= m.frame_index < len(p.frames) and p.frames[m.frame_index] is not None:
                return  # a late copy of a frame another compositor made (re-dispatched)
            if p is not None:
                if not p.future.done():
                    p.future.set_exception(Failed(m.error))
                if p.abandoned and isinstance(m, msg.InferFailed):
                    self._finish(p)
        elif isinstance(m, msg.ControlReply):
            c = self.controls.get(m.request_id)
            if c is not None and not c.future.done():
                c.future.set_result(m)
        elif isinstance(m, msg.Heartbeat):
            self._on_heartbeat(m)
        elif isinstance(m, msg.RoleDown):
            self._on_role_down(m)

    def _on_heartbeat(self, m: msg.Heartbeat) -> None:
        if m.role == "compositor":
            view = self.compositors.setdefault(m.index, RoleView())
            if view.pid and view.pid != m.pid:
                view.restarts += 1
                if not view.silent:
                    self._compositor_lost(m.index, f"compositor {m.index} restarted")
        elif 0 <= m.index < len(self.workers):
            view = self.workers[m.index]
            if view.pid and view.pid != m.pid:
                view.restarts += 1
                log.warning("gpu_worker %d restarted (pid %d -> %d)", m.index, view.pid, m.pid)
                self._worker_lost(m.index, f"gpu_worker {m.index} restarted", restarted=True)
        else:
            return
        view.pid, view.last_seen, view.silent = m.pid, time.monotonic(), False
        view.device_memory_used_bytes = m.device_memory_used_bytes
        view.queue_depth = m.queue_depth
        if m.role == "gpu_worker":
            view.models = m.loaded_models
            view.jobs = {"waiting": m.jobs_waiting, "redispatched": m.jobs_redispatched,
                         "compositors": [msgspec.structs.asdict(c) for c in m.compositors]}
            self.on_worker_report(m.index, m.loaded_models)

    def _on_role_down(self, m: msg.RoleDown) -> None:
        """A role announced its death. A gpu_worker's requests fail now, as on a restart
        (it sends this once its engine has stopped: it writes into no block any more); a
        compositor only stops counting for health (its workers hand its jobs to others)."""
        if m.role == "gpu_worker":
            view = self.workers[m.index] if 0 <= m.index < len(self.workers) else None
        else:
            view = self.compositors.get(m.index)
        if view is None or view.pid != m.pid:
            return  # a predecessor's last words
        log.error("%s %d (pid %d) is exiting: %s", m.role, m.index, m.pid, m.reason)
        view.silent, view.last_seen = True, 0.0  # not alive until a successor reports in
        if m.role == "gpu_worker":
            self._worker_lost(m.index, f"gpu_worker {m.index} failed: {m.reason}",
                              restarted=True)

    async def _watch_liveness(self) -> None:
        hb = self.cfg.runtime.heartbeat_s
        while True:
            await asyncio.sleep(hb / 2)
            now = time.monotonic()
            for i, w in enumerate(self.workers):
                if w.pid and not w.silent and not w.alive(now, hb):
                    log.error("gpu_worker %d (pid %d) stopped answering", i, w.pid)
                    w.silent = True
                    self._worker_lost(i, f"gpu_worker {i} is unavailable (no heartbeat)",
                                      restarted=False)
            for i, c in self.compositors.items():
                if c.pid and not c.silent and not c.alive(now, hb):
                    log.error("compositor %d (pid %d) stopped answering", i, c.pid)
                    c.silent = True
                    self._compositor_lost(i, f"compositor {i} is unavailable (no heartbeat)")

    def _worker_lost(self, index: int, reason: str, restarted: bool) -> None:
        """Fail everything the worker held.

        Its arena blocks come back only once it provably cannot write into them any more
        (it restarted, or it reports the request finished); a worker that is merely silent
        may still be computing.
        """
        for p in [p for p in self.pending.values() if p.worker == index]:
            if restarted:
                self._finish(p)
            else:
                p.abandoned = p.done is None
            if not p.future.done():
                p.future.set_exception(Unavailable(f"{reason}; request failed"))
        for c in self.controls.values():
            if c.worker == index and not c.future.done():
                c.future.set_exception(Unavailable(reason))
        if restarted:
            self.on_worker_restart(index)

    def _compositor_lost(self, index: int, reason: str) -> None:
        """Nothing fails: the gpu_workers hand the jobs a lost compositor held to the
        others (they pull work with credits), and a late frame from it is a duplicate that
        the FrameDone handling drops. Health counts only live compositors."""
        log.warning("%s; the gpu_workers hand its frames to the other compositors", reason)

    # ---- shutdown --------------------------------------------------------------------

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for sock in [self.inbox, *self.to_workers]:
            sock.close(0)
        self.ctx.term()
        self.arena.close()
