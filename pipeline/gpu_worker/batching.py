"""Dynamic batching: which queued requests share one UNet run, and the staging batch a
shared run gathers their tensors into.

The engine coalesces the requests of one model that are queued (or arrive within
`batching.max_queue_delay_ms`) into one run of at most `max_batch_frames` frames (auto: 32
on CUDA; 1, no coalescing, on CPU). A run of one request binds its shared-memory tensors
directly; a coalesced run gathers the requests' inputs into one contiguous staging batch
and scatters the predictions back into each request's output block.
"""
from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from pipeline import messages as msg
from pipeline.synctalk import AUDIO_SHAPE, PREDICTION_SHAPE, VISUAL_SHAPE


class Inbox:
    """The engine's input. The shell's threads put into the queue; the engine alone takes
    from it, and keeps the items a batch search took out but could not use in `backlog`,
    served first and in their order."""

    def __init__(self) -> None:
        self.queue: queue.Queue[object] = queue.Queue()
        self.backlog: deque[object] = deque()

    def put(self, item: object) -> None:
        self.queue.put(item)

    def next(self, deadline: float) -> object | None:
        """The next item, waiting until `deadline` (monotonic) at most; None if none came."""
        if self.backlog:
            return self.backlog.popleft()
        return self.wait(deadline)

    def wait(self, deadline: float) -> object | None:
        """The next item of the queue (not the backlog), waiting until `deadline` at most."""
        try:
            return self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def depth(self) -> int:
        """Items waiting (read by the heartbeat thread: approximate by nature)."""
        return self.queue.qsize() + len(self.backlog)


def coalesce(first: msg.InferRequest, inbox: Inbox, max_frames: int,
             delay_s: float) -> list[msg.InferRequest]:
    """`first` and the requests of its model queued behind it, or arriving within `delay_s`,
    up to `max_frames` frames. Other items keep their order in the backlog; a control
    message, or a request of the model that does not fit, ends the search (a control
    message is never overtaken, and the request that did not fit goes first next time)."""
    run, frames, set_aside = [first], first.batch_size, []
    earlier = list(inbox.backlog)
    inbox.backlog.clear()
    deadline = time.monotonic() + delay_s
    while frames < max_frames:
        item = earlier.pop(0) if earlier else inbox.wait(deadline)
        if item is None:
            break
        if not isinstance(item, msg.InferRequest):
            set_aside.append(item)
            break
        if item.model_id != first.model_id:
            set_aside.append(item)
            continue
        if frames + item.batch_size > max_frames:
            set_aside.append(item)
            break
        run.append(item)
        frames += item.batch_size
    inbox.backlog.extend(set_aside + earlier)
    return run


UNetRun = Callable[[np.ndarray, np.ndarray, np.ndarray], None]
# one request's part of a run: its visual input, its features and its output block
Part = tuple[np.ndarray, np.ndarray, np.ndarray]


class StagingBatch:
    """The contiguous batch a coalesced run gathers its requests into (allocated once, at
    the first coalesced run: a worker that never coalesces never pays for it)."""

    def __init__(self, max_frames: int) -> None:
        self.visual = np.empty((max_frames, *VISUAL_SHAPE), np.float32)
        self.audio = np.empty((max_frames, *AUDIO_SHAPE), np.float32)
        self.output = np.empty((max_frames, *PREDICTION_SHAPE), np.float32)

    def run(self, unet: UNetRun, parts: Sequence[Part]) -> None:
        """Gather the parts' inputs, one UNet run, scatter the predictions to their outputs."""
        frames = sum(len(visual) for visual, _, _ in parts)
        visual, audio, output = self.visual[:frames], self.audio[:frames], self.output[:frames]
        for (v, features, _), rows in zip(parts, _rows(parts), strict=True):
            visual[rows] = v
            audio[rows] = features
        unet(visual, audio, output)
        for (_, _, out), rows in zip(parts, _rows(parts), strict=True):
            out[...] = output[rows]


def _rows(parts: Sequence[Part]) -> Iterator[slice]:
    start = 0
    for visual, _, _ in parts:
        yield slice(start, start + len(visual))
        start += len(visual)
