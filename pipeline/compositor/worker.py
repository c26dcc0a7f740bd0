"""A compositor process: pulls CompositeJobs from every gpu_worker, reads the prediction
and the background in place from shared memory, pastes, encodes the JPEG and pushes it
to the frontend as [FrameDone header, JPEG] (the JPEG as its own ZMQ frame).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from multiprocessing.connection import Connection

import cv2
import zmq

from pipeline import messages as msg
from pipeline.compositor.composite import encode_jpeg, paste
from pipeline.config import Config
from pipeline.runtime.addresses import Addresses
from pipeline.runtime.logs import logging_request
from pipeline.runtime.process import Readiness, run_role
from pipeline.runtime.sockets import make_socket
from pipeline.shm.segment import SegmentCache

log = logging.getLogger(__name__)


def run_compositor_process(cfg: Config, index: int, ready: Connection | None = None) -> None:
    """Entry point of compositor `index` (spawned, or run by systemd)."""
    role = f"compositor {index}"
    run_role(role, ready, lambda readiness, stop: Compositor(cfg, index).serve(readiness, stop),
             lock=Addresses.of(cfg).role_lock(role))


class Compositor:
    def __init__(self, cfg: Config, index: int) -> None:
        self.cfg = cfg
        self.index = index
        self.addresses = Addresses.of(cfg)
        self.segments = SegmentCache()
        cv2.setNumThreads(1)  # parallelism comes from the pool, not from inside one frame

    def serve(self, readiness: Readiness, stop: threading.Event) -> None:
        workers = range(self.cfg.gpus.count)
        ctx = zmq.Context()
        jobs = make_socket(ctx, zmq.PULL, connect=[self.addresses.worker_jobs(i) for i in workers])
        events = make_socket(ctx, zmq.SUB,
                             connect=[self.addresses.worker_events(i) for i in workers])
        results = make_socket(ctx, zmq.PUSH, connect=[self.addresses.frontend_inbox])
        poller = zmq.Poller()
        poller.register(jobs, zmq.POLLIN)
        poller.register(events, zmq.POLLIN)
        heartbeat = msg.encode(msg.Heartbeat(role="compositor", index=self.index, pid=os.getpid()))
        next_beat = 0.0
        readiness.ready()
        log.info("ready")
        try:
            while not stop.is_set():
                if time.monotonic() >= next_beat:
                    self._send(results, [heartbeat])
                    # a dead frontend's arena (or a dead worker's backgrounds) goes at once
                    self.segments.forget_dead()
                    next_beat = time.monotonic() + self.cfg.runtime.heartbeat_s
                ready_socks = dict(poller.poll(100))
                if events in ready_socks:
                    release = msg.compositor_decoder.decode(events.recv())
                    if isinstance(release, msg.ReleaseSegment):
                        self.segments.forget(release.segment)
                if jobs in ready_socks:
                    job = msg.compositor_decoder.decode(jobs.recv())
                    if isinstance(job, msg.CompositeJob):
                        self._send(results, self.composite(job))
        finally:
            self.segments.close()
            for sock in (jobs, events, results):
                sock.close(0)
            ctx.term()

    def composite(self, job: msg.CompositeJob) -> list[bytes]:
        """The frames to push for one job: [FrameDone, JPEG] or [FrameFailed]."""
        with logging_request(job.request_id):
            return self._composite(job)

    def _composite(self, job: msg.CompositeJob) -> list[bytes]:
        t0 = time.perf_counter_ns()
        try:
            prediction = self._view(job.prediction)
            background = self._view(job.background)
            frame = paste(background, prediction, job.rect, job.mode)
            t1 = time.perf_counter_ns()
            jpeg = encode_jpeg(frame, job.jpeg_quality)
        except Exception as exc:
            log.exception("compositing frame %d of request %d failed", job.frame_index,
                          job.request_id)
            return [msg.encode(msg.FrameFailed(job.request_id, job.frame_index,
                                               f"failed to composite frame {job.frame_index}: {exc}"))]
        header = msg.FrameDone(job.request_id, job.frame_index, self.index, paste_ns=t1 - t0,
                               jpeg_ns=time.perf_counter_ns() - t1)
        return [msg.encode(header), jpeg]

    def _view(self, ref: msg.TensorRef):
        return self.segments.ndarray(ref.segment, ref.offset, ref.shape, ref.dtype)

    @staticmethod
    def _send(sock: zmq.Socket, frames: list[bytes]) -> None:
        try:
            sock.send_multipart(frames)  # copied: zero-copy frames cost as much at ~60 KB
        except zmq.Again:
            log.error("frontend unreachable; result dropped")
