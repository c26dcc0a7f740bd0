"""Dynamic batching: which queued requests share one UNet run, and the staging batch a
shared run gathers their tensors into.

The engine coalesces the requests of one model that are queued (or arrive within
`batching.max_queue_delay_ms`) into one run of at most `max_batch_frames` frames (auto: 32
on CUDA; 1, no coalescing, on CPU). A run of one request binds its shared-memory tensors
directly; a coalesced run gathers the requests' inputs into one contiguous staging batch
and scatters the predictions back into each request's output block.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from pipeline import messages as msg
from pipeline.synctalk import AUDIO_SHAPE, PREDICTION_SHAPE, VISUAL_SHAPE

LIVE, BATCH = 0, 1  # what the engine takes first: a live session's requests, then the rest
Entry = tuple[int, int, object]  # (class, arrival, item)


def _class(item: object) -> int:
    return LIVE if isinstance(item, msg.InferRequest) and item.live else BATCH


class Inbox:
    """The engine's input. The shell's threads put into it; the engine alone takes from it:
    a live session's requests before anything else (latency-bound: a frame late is a frame
    lost), everything else in the order it came. A batch search gives back what it took out
    but could not use, in its place."""

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._arrivals = itertools.count()
        self._ready = threading.Condition()
        self._woken = False

    def put(self, item: object) -> None:
        with self._ready:
            heapq.heappush(self._heap, (_class(item), next(self._arrivals), item))
            self._ready.notify()

    def next(self, deadline: float) -> object | None:
        """The next item, waiting until `deadline` (monotonic) at most; None if none came."""
        entry = self.take(deadline)
        return None if entry is None else entry[2]

    def take(self, deadline: float) -> Entry | None:
        with self._ready:
            while not self._heap:
                left = deadline - time.monotonic()
                if left <= 0 or self._woken:
                    self._woken = False
                    return None
                self._ready.wait(left)
            return heapq.heappop(self._heap)

    def wake(self) -> None:
        """The reader waiting for an item returns now, with none (the shell's stop)."""
        with self._ready:
            self._woken = True
            self._ready.notify_all()

    def give_back(self, entries: list[Entry]) -> None:
        """Entries taken out and not used: they keep their place (class and arrival)."""
        with self._ready:
            for entry in entries:
                heapq.heappush(self._heap, entry)
            if entries:
                self._ready.notify()

    def depth(self) -> int:
        """Items waiting (read by the heartbeat thread: approximate by nature)."""
        return len(self._heap)


def coalesce(first: msg.InferRequest, inbox: Inbox, max_frames: int,
             delay_s: float) -> list[msg.InferRequest]:
    """`first` and the requests of its model and class (live or batch) queued behind it, or
    arriving within `delay_s`, up to `max_frames` frames. Other items keep their place; a
    control message, a request of the other class, or a request of the model that does not
    fit ends the search (a control message is never overtaken, and the request that did not
    fit goes first next time)."""
    run, frames, set_aside = [first], first.batch_size, []
    deadline = time.monotonic() + delay_s
    while frames < max_frames:
        entry = inbox.take(deadline)
        if entry is None:
            break
        item = entry[2]
        if not isinstance(item, msg.InferRequest) or item.live != first.live:
            set_aside.append(entry)
            break
        if item.model_id != first.model_id:
            set_aside.append(entry)
            continue
        if frames + item.batch_size > max_frames:
            set_aside.append(entry)
            break
        run.append(item)
        frames += item.batch_size
    inbox.give_back(set_aside)
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
        """Gather the parts' inputs, one UNet run, scatter the predictions to their outputs.

        A visual input built into its own rows of this batch (`visual_rows`) is not copied.
        One built a few rows further on (a request before it in the run failed) moves down,
        in order: a part's rows never start after its source, so no copy overwrites a
        later part's input before it is gathered."""
        frames = sum(len(visual) for visual, _, _ in parts)
        visual, audio, output = self.visual[:frames], self.audio[:frames], self.output[:frames]
        for (v, features, _), rows in zip(parts, _rows(parts), strict=True):
            if not _same_memory(v, visual[rows]):
                visual[rows] = v
            audio[rows] = features
        unet(visual, audio, output)
        for (_, _, out), rows in zip(parts, _rows(parts), strict=True):
            out[...] = output[rows]

    def visual_rows(self, sizes: Sequence[int]) -> list[np.ndarray]:
        """The rows of this batch that each request of a run of these sizes (in order) takes:
        a visual input built there is gathered without a copy."""
        starts = itertools.accumulate(sizes, initial=0)
        # (starts ends with the run's total, one more than the sizes)
        return [self.visual[start:start + n] for start, n in zip(starts, sizes, strict=False)]


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and \
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


def _rows(parts: Sequence[Part]) -> Iterator[slice]:
    start = 0
    for visual, _, _ in parts:
        yield slice(start, start + len(visual))
        start += len(visual)
