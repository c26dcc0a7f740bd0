"""Requests in flight between the frontend and the worker tier, and the arena blocks
they own.

Each request owns one block of the frontend's shared-memory arena from admission until it
is answered — or, when its client gave up (timeout, cancel), until its worker has let go
of the block (reported the request finished, or restarted). Everything here runs on the
frontend's event loop: no locks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline import messages as msg
from pipeline.config import Config
from pipeline.frontend.errors import Failed, Overloaded, Unavailable
from pipeline.frontend.liveness import RoleView
from pipeline.frontend.validation import InferInput, copy_finite_visual
from pipeline.protocol import RequestLayout
from pipeline.runtime.addresses import Addresses
from pipeline.runtime.logs import request_id as log_request
from pipeline.runtime.process import RoleError
from pipeline.shm.arena import Arena, Block
from pipeline.shm.segment import shm_space, sweep_stale_segments

log = logging.getLogger(__name__)

ARENA_SPACE_WAIT_S = 10.0


class WorkerSend(Protocol):
    """What the in-flight table needs of the worker client: its addresses (the arena's
    name), request ids, and a send to a gpu_worker."""

    addresses: Addresses

    def next_id(self) -> int: ...

    async def send(self, worker: int, message: bytes) -> None: ...


class AliveWorkers(Protocol):
    """What it needs of the liveness view: a worker's view when it is alive."""

    def worker(self, index: int) -> RoleView | None: ...


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
    """One request on its way through the pipeline."""

    request_id: int
    worker: int
    block: Block | None          # None: a request with no tensors (background frames)
    frames: list[bytes | None]
    future: asyncio.Future[InferResult]
    input_copy_ns: int = 0
    done: msg.InferDone | None = None
    received: int = 0
    paste_ns: int = 0
    jpeg_ns: int = 0
    abandoned: bool = False  # the client gave up; the block waits for the worker
    per_compositor_ns: dict[int, int] = field(default_factory=dict)

    def frames_done(self, m: msg.FramesDone, jpegs: list[bytes]) -> None:
        """A job's JPEGs; the frames already here (a redispatched job's late duplicate) are
        kept as they are."""
        new = [(i, jpeg) for i, jpeg in enumerate(jpegs, m.first_frame)
               if 0 <= i < len(self.frames) and self.frames[i] is None]
        if not new:
            return
        for i, jpeg in new:
            self.frames[i] = jpeg
        self.received += len(new)
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


class ArenaDoesNotFit(RoleError):
    """/dev/shm has no room for the request arena."""


def arena_does_not_fit(size: int) -> ArenaDoesNotFit:
    free, total = shm_space()
    return ArenaDoesNotFit(
        f"the request arena (runtime.arena_mb: {size // 2**20} MB) does not fit in /dev/shm "
        f"({free // 2**20} MB free of {total // 2**20} MB): give /dev/shm more room (a "
        f"container: `docker run --shm-size=4g`; a host: docs/deploy.md, \"Shared memory "
        f"(/dev/shm) sizing\"), or lower runtime.arena_mb")


def check_arena_fits(cfg: Config) -> None:
    """ArenaDoesNotFit unless /dev/shm has room for the arena, counting what this instance's
    dead processes left there as free (its roles remove it as they start): for a start
    that fails at once, before any role is spawned."""
    sweep_stale_segments(cfg.runtime.instance)
    size = cfg.runtime.arena_mb * 2**20
    if shm_space()[0] < size:
        raise arena_does_not_fit(size)


def create_arena(name: str, size: int) -> Arena:
    """The request arena. /dev/shm may be short for a moment after a frontend died: its
    arena is unlinked but mapped by the other roles until they notice (within a heartbeat),
    so the space is waited for briefly before giving up; an arena larger than all of
    /dev/shm is refused at once."""
    if size > shm_space()[1]:
        raise arena_does_not_fit(size)
    deadline = time.monotonic() + ARENA_SPACE_WAIT_S
    waiting = False
    while True:
        try:
            return Arena.create(name, size)
        except MemoryError as exc:
            if time.monotonic() > deadline:
                raise arena_does_not_fit(size) from exc
            if not waiting:
                log.warning("%s; waiting up to %.0f s for the other roles to let go of a dead "
                            "frontend's arena", exc, ARENA_SPACE_WAIT_S)
                waiting = True
            time.sleep(0.25)


class InFlight:
    def __init__(self, cfg: Config, client: WorkerSend, liveness: AliveWorkers) -> None:
        self.client = client
        self.liveness = liveness
        self.arena = create_arena(client.addresses.request_arena(), cfg.runtime.arena_mb * 2**20)
        self.pending: dict[int, Pending] = {}
        self._space_freed = asyncio.Event()

    # ---- one request ---------------------------------------------------------------------

    async def submit(self, worker: int, req: InferInput, deadline: float) -> InferResult:
        """Run one request on `worker`: its tensors into the arena, frames back in order."""
        b = req.batch_size
        layout = RequestLayout(b, 0 if req.audio is None else req.audio.nbytes,
                               0 if req.features is None else req.features.nbytes,
                               visual=req.visual is not None)
        size = layout.nbytes
        if size > self.arena.capacity:
            raise Overloaded(f"request needs {size} bytes of shared memory; the arena has "
                             f"{self.arena.capacity} (runtime.arena_mb)")
        block = await self._allocate(size, deadline)
        pending: Pending | None = None
        refs = layout.refs(block.segment, block.offset)
        if req.visual is None:  # audio alone: a copy of microseconds, done right here
            write = asyncio.get_running_loop().create_future()
            write.set_result(self._write_inputs(req, refs))
        else:  # megabytes: in a thread (numpy lets go of the GIL), the loop serves others
            write = asyncio.ensure_future(asyncio.to_thread(self._write_inputs, req, refs))
        try:
            copy_ns = await asyncio.shield(write)
            view = self.liveness.worker(worker)
            if view is None:
                raise Unavailable(f"gpu_worker {worker} is unavailable (restarting or not answering)")
            request_id = self.client.next_id()
            log_request.set(f"{request_id:x}")
            pending = Pending(request_id, worker, block, [None] * b,
                              asyncio.get_running_loop().create_future(), input_copy_ns=copy_ns)
            self.pending[request_id] = pending
            await self.client.send(worker, msg.encode(msg.InferRequest(
                request_id=request_id, worker_pid=view.pid, model_id=req.model_id,
                batch_size=b, start_frame_idx=req.start_frame_idx, output=refs["output"],
                visual=refs.get("visual"), audio=refs.get("audio"),
                sample_rate=req.sample_rate, features=refs.get("features"),
                stream_offset=req.stream_offset, sent_ns=time.monotonic_ns(),
                background_indices=req.background_indices, live=req.live)))
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

    async def background_jpegs(self, worker: int, model_id: str, indices: tuple[int, ...],
                          deadline: float) -> list[bytes]:
        """The JPEGs of these background frames of the model as they are (idle frames):
        no tensors, no arena block; the compositors encode them."""
        view = self.liveness.worker(worker)
        if view is None:
            raise Unavailable(f"gpu_worker {worker} is unavailable (restarting or not answering)")
        request_id = self.client.next_id()
        pending = Pending(request_id, worker, None, [None] * len(indices),
                          asyncio.get_running_loop().create_future())
        self.pending[request_id] = pending
        try:
            await self.client.send(worker, msg.encode(msg.BackgroundJpegs(
                request_id, view.pid, model_id, indices)))
            async with asyncio.timeout(deadline - time.monotonic()):
                result = await asyncio.shield(pending.future)
        finally:
            self.pending.pop(request_id, None)
        return list(result.frames)

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
        if self.pending.pop(pending.request_id, None) is not None and pending.block is not None:
            self._release(pending.block)

    def _write_inputs(self, req: InferInput, refs: dict[str, msg.TensorRef]) -> int:
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

    # ---- what the worker tier reports ------------------------------------------------------

    def on_frames_done(self, m: msg.Message, jpegs: list[bytes]) -> None:
        assert isinstance(m, msg.FramesDone)
        p = self.pending.get(m.request_id)
        if p is not None:
            p.frames_done(m, jpegs)
            p.complete_if_ready()

    def on_infer_done(self, m: msg.Message, _: list[bytes]) -> None:
        assert isinstance(m, msg.InferDone)
        p = self.pending.get(m.request_id)
        if p is not None:
            p.done = m
            if p.abandoned:
                self._finish(p)
            else:
                p.complete_if_ready()

    def on_failed(self, m: msg.Message, _: list[bytes]) -> None:
        assert isinstance(m, (msg.InferFailed, msg.FramesFailed))
        p = self.pending.get(m.request_id)
        if isinstance(m, msg.FramesFailed) and p is not None and \
                0 <= m.first_frame < len(p.frames) and p.frames[m.first_frame] is not None:
            return  # a late duplicate (a revived compositor's) of a job already received
        if p is not None:
            if not p.future.done():
                p.future.set_exception(Failed(m.error))
            if p.abandoned and isinstance(m, msg.InferFailed):
                self._finish(p)

    def fail_worker(self, index: int, reason: str, restarted: bool) -> None:
        """Fail everything the worker held. Its blocks come back only once it provably
        cannot write into them any more (it restarted or exited); a worker that is merely
        silent may still be computing, and gives them back by reporting them finished."""
        for p in [p for p in self.pending.values() if p.worker == index]:
            if restarted:
                self._finish(p)
            else:
                p.abandoned = p.done is None
            if not p.future.done():
                p.future.set_exception(Unavailable(f"{reason}; request failed"))

    def snapshot(self) -> dict[str, Any]:
        per_worker: dict[int, int] = {}
        for p in self.pending.values():
            per_worker[p.worker] = per_worker.get(p.worker, 0) + 1
        return {"inflight_requests": len(self.pending), "per_worker": per_worker,
                "arena": {"name": self.arena.name, "capacity_bytes": self.arena.capacity,
                          "used_bytes": self.arena.used_bytes,
                          "blocks": self.arena.blocks_in_use}}

    def close(self) -> None:
        self.arena.close()
