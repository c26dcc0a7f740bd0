"""A compositor process: takes CompositeJobs (a few frames of a request each) from every
gpu_worker, reads the predictions and the backgrounds in place from shared memory, pastes,
encodes the JPEGs and pushes them to the frontend as one message, [FramesDone header, JPEG,
...] (each JPEG its own ZMQ frame).

Work is pulled: one DEALER per gpu_worker, on which this compositor grants CREDITS jobs and
returns a credit after each job's frames have gone to the frontend (never before: a job
whose credit came back is one the worker no longer keeps). The credit, resent every
heartbeat period, is also this compositor's heartbeat to the worker, which hands the jobs
of a silent or dead compositor to the others.

Death is announced: if the loop raises (e.g. a message it cannot decode: a worker of
another version), msg.RoleDown goes to the frontend (`Readiness.down`) and to every
worker on this compositor's own connections (the jobs it held go to the others) before it
exits.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import cv2
import numpy as np
import zmq

from pipeline import messages as msg
from pipeline.compositor.composite import composite_job
from pipeline.compositor.jpeg_splice import BackgroundJpegs
from pipeline.config import Config
from pipeline.runtime.addresses import Addresses
from pipeline.runtime.process import (
    ANNOUNCE_LINGER_MS,
    Readiness,
    StopFlag,
    failure_reason,
    role_down,
    run_role,
)
from pipeline.runtime.sockets import make_socket
from pipeline.shm.segment import SegmentCache

log = logging.getLogger(__name__)

# Jobs a compositor holds per gpu_worker: the one it composites and one queued behind it,
# so it never idles for the credit's round trip (a thread hop in the worker, which may wait
# for the GIL for a few ms, against ~10 ms of paste + JPEG per 720p frame); more would only
# let a slow or frozen compositor sit on frames the others could make. Not a setting:
# nothing about a deployment changes that reasoning.
CREDITS = 2


def run_compositor_process(cfg: Config, index: int, ready: Connection | None = None) -> None:
    """Entry point of compositor `index` (spawned, or run by systemd)."""
    role = f"compositor {index}"
    addresses = Addresses.of(cfg)
    run_role(role, ready,
             lambda readiness, stop: CompositorProc(cfg, index).serve(readiness, stop),
             lock=addresses.role_lock(role), announce_to=addresses.frontend_inbox)


class CompositorProc:
    def __init__(self, cfg: Config, index: int) -> None:
        self.cfg = cfg
        self.index = index
        self.pid = os.getpid()
        self.addresses = Addresses.of(cfg)
        self.segments = SegmentCache()
        self.jpegs = BackgroundJpegs(cfg.compositor.background_jpeg_cache_mb * 2**20)
        self.results: zmq.Socket[Any] | None = None
        self.handlers: dict[type, Callable[[Any, zmq.Socket[Any]], None]] = {
            msg.CompositeJob: self._on_job, msg.ReleaseSegment: self._on_release}
        cv2.setNumThreads(1)  # parallelism comes from the pool, not from inside one frame

    def serve(self, readiness: Readiness, stop: StopFlag) -> None:
        a = self.addresses
        ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context()
        workers = [make_socket(ctx, zmq.DEALER, connect=[a.worker_jobs(i)])
                   for i in range(self.cfg.gpus.count)]
        events = make_socket(ctx, zmq.SUB,
                             connect=[a.worker_events(i) for i in range(self.cfg.gpus.count)])
        self.results = results = make_socket(ctx, zmq.PUSH, connect=[a.frontend_inbox])
        poller = zmq.Poller()
        for sock in (*workers, events):
            poller.register(sock, zmq.POLLIN)
        poller.register(stop.fileno(), zmq.POLLIN)  # a stop wakes the poll at once
        heartbeat = msg.encode(msg.Heartbeat(role="compositor", index=self.index, pid=self.pid))
        grant = msg.encode(msg.Credit(self.index, self.pid, CREDITS))
        next_beat = 0.0
        readiness.ready()
        log.info("ready")
        linger = 0
        try:
            while not stop.is_set():
                if time.monotonic() >= next_beat:
                    self._send(results, [heartbeat])
                    for worker in workers:  # the first one also grants the credits
                        self._send(worker, [grant])
                    # a dead frontend's arena (or a dead worker's backgrounds) goes at once
                    for segment in self.segments.forget_dead():
                        self.jpegs.forget(segment)
                    next_beat = time.monotonic() + self.cfg.runtime.heartbeat_s
                wait_ms = max(0.0, next_beat - time.monotonic()) * 1000
                for sock, _ in poller.poll(math.ceil(wait_ms)):
                    if isinstance(sock, int):  # the stop's descriptor
                        continue
                    message = msg.compositor_decoder.decode(sock.recv())
                    self.handlers[type(message)](message, sock)
        except Exception as exc:
            readiness.down(exc)
            linger = ANNOUNCE_LINGER_MS
            down = msg.encode(role_down(f"compositor {self.index}", self.pid, failure_reason(exc)))
            for sock in workers:
                self._send(sock, [down])
            raise
        finally:
            self.segments.close()
            for sock in (*workers, events, results):
                sock.close(linger)
            ctx.term()

    def _on_job(self, job: msg.CompositeJob, worker: zmq.Socket[Any]) -> None:
        assert self.results is not None
        cpu0 = time.thread_time_ns()
        frames = composite_job(job, self._view, self.index, self.jpegs)
        # a rendered frame's CPU, for the worker's thread split (an idle frame is no measure)
        cpu_ns = (time.thread_time_ns() - cpu0) // len(job.backgrounds) \
            if job.predictions is not None and job.backgrounds else 0
        self._send(self.results, frames)
        # after the frames: once the credit is back, the worker forgets the job
        self._send(worker, [msg.encode(msg.Credit(self.index, self.pid, CREDITS,
                                                  job.request_id, job.first_frame, cpu_ns))])

    def _on_release(self, release: msg.ReleaseSegment, _: zmq.Socket[Any]) -> None:
        self.segments.forget(release.segment)
        self.jpegs.forget(release.segment)

    def _view(self, ref: msg.TensorRef) -> np.ndarray:
        return self.segments.ndarray(ref.segment, ref.offset, ref.shape, ref.dtype)

    @staticmethod
    def _send(sock: zmq.Socket[Any], frames: list[bytes]) -> None:
        try:
            # copied: zero-copy frames cost as much at ~60 KB; never blocks: a peer that is
            # not there (yet) gets it when it connects, or a fresher one
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            log.error("peer unreachable; message dropped")
