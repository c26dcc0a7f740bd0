"""The gpu_worker process: the shell around the engine, one per device, pinned to it.

The engine (engine.py) computes on this process's main thread and never touches a socket:
a compute loop that waited on a socket could stall every request of the device. Around it:
- the receiver thread bridges the inbox socket into the engine's inbox;
- the loader thread builds models and puts each outcome into the inbox (LoadFinished);
- the sender thread carries what the engine emits to the frontend and the compositors'
  event channel, and its CompositeJobs to the link thread;
- the link thread owns the jobs ROUTER: compositors pull jobs with credits through it
  (credits.py), and a lost compositor's jobs go to the others;
- the heartbeat thread has a socket of its own, so no data send (one can block for the
  socket factory's send timeout) can delay a heartbeat and get a live worker declared dead.

Death is announced: when the engine or an IO thread raises, the shell sends msg.RoleDown
to the frontend (`Readiness.down`: the message of the role's prologue) before it cleans
up and exits, so the frontend fails this worker's requests at once instead of after
heartbeats go silent. A worker killed outright is announced by the supervisor that saw
its process exit.
"""
from __future__ import annotations

import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import setproctitle
import zmq

from pipeline import messages as msg
from pipeline.config import Config, ModelConfig
from pipeline.gpu_worker.batching import Inbox
from pipeline.gpu_worker.credits import CreditDispatcher
from pipeline.gpu_worker.device import Resolved, pin_to_device
from pipeline.gpu_worker.engine import EVENTS, FRONTEND, JOBS, EncodedFrames, Engine
from pipeline.gpu_worker.model_cache import ModelCache, load_finished, unet_rebuilt
from pipeline.runtime.addresses import Addresses
from pipeline.runtime.process import LIVENESS_BEATS, Readiness, StopFlag, run_role
from pipeline.runtime.sockets import make_socket

log = logging.getLogger(__name__)

STOP_FLUSH_S = 0.5          # stopping: what is queued goes out by then, or never
CHECK_S = 0.1               # how often the link thread looks for exited or silent compositors
JOB_KEY = struct.Struct("<qq?")  # (request_id, first_frame, live) beside a job on the inproc hop
JOBS_INPROC = "inproc://jobs"


def run_gpu_worker_process(cfg: Config, gpu_index: int, provider: Resolved,
                           ready: Connection | None = None) -> None:
    """Entry point of gpu_worker `gpu_index` (spawned, or run by systemd)."""
    pin_to_device(provider, gpu_index)  # before onnxruntime is imported anywhere
    role = f"gpu_worker {gpu_index}"
    addresses = Addresses.of(cfg)
    run_role(role, ready,
             lambda readiness, stop: GpuWorkerProc(cfg, gpu_index, provider).serve(readiness, stop),
             lock=addresses.role_lock(role), announce_to=addresses.frontend_inbox)


class GpuWorkerProc:
    def __init__(self, cfg: Config, gpu_index: int, provider: Resolved) -> None:
        self.cfg = cfg
        self.index = gpu_index
        self.provider = provider
        self.addresses = Addresses.of(cfg)
        self.inbox = Inbox()
        self.cache = ModelCache(cfg, gpu_index, provider)
        self.outbox: queue.Queue[tuple[str, list[bytes]] | None] = queue.Queue()
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="loader",
                                         initializer=setproctitle.setthreadtitle,
                                         initargs=("loader",))
        self.engine = Engine.create(cfg, gpu_index, provider, self.inbox, self.cache,
                                    self._post, self._start_load)
        self.credits = CreditDispatcher(LIVENESS_BEATS * cfg.runtime.heartbeat_s)
        # the link thread's picture for heartbeats: (compositors, jobs waiting, redispatched),
        # replaced whole (the heartbeat thread must not iterate the dispatcher's dicts)
        self.link_view: tuple[list[msg.CompositorLink], int, int] = ([], 0, 0)
        self.sender_done = threading.Event()
        self.failure: tuple[str, Exception] | None = None  # an IO thread that raised

    def _post(self, target: str, message: msg.Message | EncodedFrames) -> None:
        """The engine's `emit`: queued for the sender thread, never a socket call here."""
        if isinstance(message, EncodedFrames):  # each JPEG its own frame, as a compositor's
            self.outbox.put((target, [msg.encode(message.header), *message.jpegs]))
            return
        frames = [msg.encode(message)]
        if isinstance(message, msg.CompositeJob):
            frames.insert(0, JOB_KEY.pack(message.request_id, message.first_frame, message.live))
        self.outbox.put((target, frames))

    def _start_load(self, config: ModelConfig, rebuild: bool) -> None:
        work = unet_rebuilt if rebuild else load_finished
        self.loader.submit(lambda: self.inbox.put(work(self.cache, config)))

    # ---- the process -------------------------------------------------------------------

    def serve(self, readiness: Readiness, stop: StopFlag) -> None:
        a, i = self.addresses, self.index
        ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context()
        inbox = make_socket(ctx, zmq.PULL, bind=a.worker_inbox(i))
        out = {FRONTEND: make_socket(ctx, zmq.PUSH, connect=[a.frontend_inbox]),
               EVENTS: make_socket(ctx, zmq.PUB, bind=a.worker_events(i)),
               JOBS: make_socket(ctx, zmq.PUSH, bind=JOBS_INPROC)}
        jobs_in = make_socket(ctx, zmq.PULL, connect=[JOBS_INPROC])
        router = make_socket(ctx, zmq.ROUTER, bind=a.worker_jobs(i))
        beat = make_socket(ctx, zmq.PUSH, connect=[a.frontend_inbox])
        threads = [self._thread("receiver", stop, self._receive, inbox),
                   self._thread("sender", stop, self._send, out),
                   self._thread("link", stop, self._link, router, jobs_in)]
        heartbeat = threading.Thread(target=self._beat, args=(beat, stop), name="heartbeat")
        stop.on_set(self.inbox.wake)  # the engine waits on its inbox, never on a timer
        for t in [*threads, heartbeat]:
            t.start()
        log.info("ready (%s, device %d)", self.cache.backend.label(), i)
        readiness.ready()
        failure: Exception | None = None
        try:
            self.engine.run(stop)
        except Exception as exc:
            failure = exc
        stop.set()
        self.outbox.put(None)  # the sender's last message: nothing follows
        heartbeat.join()
        if failure is None and self.failure is not None:
            name, cause = self.failure
            failure = RuntimeError(f"the {name} thread failed: {type(cause).__name__}: {cause}")
            failure.__cause__ = cause
        if failure is not None:  # now, not after the clean-up: a load may hold it for seconds
            readiness.down(failure)
        for t in threads:
            t.join()
        self.loader.shutdown(wait=True, cancel_futures=True)
        self.engine.close()
        for sock in [inbox, jobs_in, router, *out.values()]:
            sock.close(0)
        beat.close(0)
        ctx.term()
        if failure is not None:
            raise failure

    def _thread(self, name: str, stop: threading.Event, target: Callable[..., None],
                *args: object) -> threading.Thread:
        """An IO thread running target(*args, stop) whose failure stops the process (and is
        announced), never a silent hang."""

        def guarded() -> None:
            setproctitle.setthreadtitle(name)  # as `top -H` and /proc show it
            try:
                target(*args, stop)
            except Exception as exc:
                log.exception("the %s thread failed", name)
                self.failure = self.failure or (name, exc)
                stop.set()

        return threading.Thread(target=guarded, name=name)

    # ---- IO threads --------------------------------------------------------------------

    def _receive(self, sock: zmq.Socket[Any], stop: StopFlag) -> None:
        pid = os.getpid()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(stop.fileno(), zmq.POLLIN)  # a stop wakes it: no timeout to look
        while not stop.is_set():
            if sock in dict(poller.poll()):
                try:
                    message = msg.worker_decoder.decode(sock.recv())
                except Exception:
                    log.exception("dropped an undecodable message")
                    continue
                # ZMQ hands a restarted worker what was queued for its predecessor; the
                # frontend has failed those requests and may reuse their memory already
                if message.worker_pid == pid:
                    self.inbox.put(message)
                else:
                    log.warning("dropped %s %d meant for pid %d", type(message).__name__,
                                message.request_id, message.worker_pid)

    def _send(self, socks: dict[str, zmq.Socket[Any]], stop: threading.Event) -> None:
        """What the engine emits, in order, until its last word (None: it has stopped)."""
        flush_until = float("inf")
        while (item := self.outbox.get()) is not None:
            if stop.is_set():  # stopping: what is queued goes out by then, or never
                flush_until = min(flush_until, time.monotonic() + STOP_FLUSH_S)
                if time.monotonic() >= flush_until:
                    continue
            target, frames = item
            try:
                # stopping, a peer that is gone (the frontend stops first) must not hold
                # this thread for a send timeout per message: don't wait for it
                socks[target].send_multipart(frames, zmq.NOBLOCK if stop.is_set() else 0)
            except zmq.Again:
                log.error("send to %s timed out; message dropped", target)
        self.sender_done.set()

    def _link(self, router: zmq.Socket[Any], jobs_in: zmq.Socket[Any],
              stop: threading.Event) -> None:
        """Jobs in from the sender, out to compositors with credits; credits and deaths in."""
        handlers: dict[type, Callable[[bytes, Any, float], None]] = {
            msg.Credit: self._on_credit,
            msg.RoleDown: lambda identity, down, now: self.credits.on_down(identity, down)}
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(jobs_in, zmq.POLLIN)
        next_check, flush_until = 0.0, float("inf")
        while True:
            if stop.is_set():
                flush_until = min(flush_until, time.monotonic() + STOP_FLUSH_S)
                if ((self.sender_done.is_set() and not self.credits.waiting)
                        or time.monotonic() >= flush_until):
                    return
            ready = dict(poller.poll(int(CHECK_S * 1000)))
            if router in ready:
                for identity, payload in _drain(router):
                    try:
                        message = msg.worker_jobs_decoder.decode(payload)
                    except Exception:
                        log.exception("dropped an undecodable message from a compositor")
                        continue
                    handlers[type(message)](identity, message, time.monotonic())
            if jobs_in in ready:
                for key, job in _drain(jobs_in):
                    request_id, first_frame, live = JOB_KEY.unpack(key)
                    self.credits.submit((request_id, first_frame), job, live)
            if time.monotonic() >= next_check:
                self.credits.check(time.monotonic())
                next_check = time.monotonic() + CHECK_S
                self.link_view = (self.credits.snapshot(), len(self.credits.waiting),
                                  self.credits.redispatched)
            for identity, job in self.credits.assignments():
                try:
                    router.send_multipart([identity, job], zmq.NOBLOCK)
                except zmq.ZMQError:  # EHOSTUNREACH: gone (EAGAIN: full, which credits rule out)
                    self.credits.unreachable(identity)

    def _on_credit(self, identity: bytes, credit: msg.Credit, now: float) -> None:
        self.credits.on_credit(identity, credit, now)
        if credit.cpu_ns > 0:
            self.cache.planner.composite(credit.cpu_ns / 1e9)

    def _beat(self, sock: zmq.Socket[Any], stop: threading.Event) -> None:
        setproctitle.setthreadtitle("heartbeat")
        while True:
            links, waiting, redispatched = self.link_view
            beat = msg.Heartbeat(
                role="gpu_worker", index=self.index, pid=os.getpid(), gpu_id=self.index,
                device_memory_used_bytes=self.cache.memory.used_bytes(),
                loaded_models=self.cache.loaded, queue_depth=self.inbox.depth(),
                jobs_waiting=waiting, jobs_redispatched=redispatched, compositors=links,
                cuda=self.provider == "cuda", backend=self.cache.backend.runtime,
                precision=self.cache.backend.precision, threads=self.cache.backend.threads,
                thread_plan=self.cache.planner.snapshot() if self.provider != "cuda" else {})
            try:
                sock.send(msg.encode(beat), zmq.NOBLOCK)
            except zmq.Again:
                pass  # no frontend to hear it: the next beat says the same, fresher
            if stop.wait(self.cfg.runtime.heartbeat_s):
                return


def _drain(sock: zmq.Socket[Any]) -> list[tuple[bytes, bytes]]:
    """Every two-frame message waiting on `sock`, without blocking."""
    out: list[tuple[bytes, bytes]] = []
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return out
        if len(frames) == 2:
            out.append((frames[0], frames[1]))
