"""A request's inputs for the UNet, as the engine prepares them before a run: its audio
features (through the model's own audio encoder) and its visual input, the client's in the
request arena or built here from the avatar's frames.

A visual input built here goes into the worker's own memory, not the arena: private pages
(huge ones where the kernel gives them; /dev/shm's tmpfs usually gets none) are cheaper to
write and read than shared memory's (a batch of 8, 19.7 MB: 1.16 ms against 1.66 on the
benchmark VM), and the request's arena block then needs no room for it
(protocol.RequestLayout). A request run alone builds into one buffer of this worker, which
the next run reuses (a run's UNet has read it before the engine prepares another), kept at
the size of the largest such request (a batch of 32: 79 MB), where the arena used to hold
2.46 MB a frame for every request in flight; the requests of a coalesced run build straight
into their rows of the run's staging batch (the engine's `_visual_rows`), so its gather
copies none of it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline import messages as msg
from pipeline.gpu_worker import audio
from pipeline.gpu_worker.model_cache import LoadedModel
from pipeline.runtime.process import release_free_heap
from pipeline.synctalk import VISUAL_SHAPE


class RequestError(Exception):
    """A request failed; the message is the client-facing error string."""


@dataclass
class Prepared:
    """A request ready for the UNet: its inputs, and what preparing it took."""

    req: msg.InferRequest
    visual: np.ndarray            # [B,6,320,320] float32: the client's, in the arena, or built
    features: np.ndarray          # [B,32,16,16] float32
    started_ns: int
    audio_ns: int
    encoder_ns: int
    visual_ns: int


def background_indices(req: msg.InferRequest) -> Sequence[int]:
    """The background frame of each of the request's frames."""
    return req.background_indices or range(req.start_frame_idx, req.start_frame_idx + req.batch_size)


class RequestInputs:
    def __init__(self, view: Callable[[msg.TensorRef], np.ndarray]) -> None:
        """`view`: a tensor of the request arena as an array."""
        self.view = view
        self.built_visual = np.empty((0, *VISUAL_SHAPE), np.float32)

    def room_to_build(self, frames: int) -> np.ndarray:
        """Rows for `frames` frames of visual input built here (grown as runs need it)."""
        if len(self.built_visual) < frames:
            self.built_visual = np.empty((frames, *VISUAL_SHAPE), np.float32)
            # the buffer it replaces goes back to the OS: the roles' heap keeps freed
            # buffers (runtime.process.keep_freed_memory), and a smaller one is never
            # asked for again (rare: once per new largest request)
            release_free_heap()
        return self.built_visual[:frames]

    def prepare(self, model: LoadedModel, req: msg.InferRequest,
                build_into: np.ndarray | None) -> Prepared:
        """The request's audio features, and its visual input: the client's in the arena, or
        built from the avatar's frames into `build_into`."""
        b = req.batch_size
        t0 = time.monotonic_ns()
        encoder_ns = 0

        def encode(windows: np.ndarray) -> np.ndarray:
            nonlocal encoder_ns
            start = time.monotonic_ns()
            encoded = model.encoder.encode(windows)
            encoder_ns += time.monotonic_ns() - start
            return encoded

        try:
            if req.stream_offset >= 0 and req.audio is not None:
                features = audio.stream_frame_features(
                    encode, self.view(req.audio), req.stream_offset, req.start_frame_idx, b)
            elif req.audio is not None:
                features = audio.request_features(encode, self.view(req.audio),
                                                  req.sample_rate, b)
            elif req.features is not None:
                features = audio.replicated_features(self.view(req.features).tobytes(), b)
            else:
                raise RequestError("Either raw_audio or audio_features must be provided")
        except RequestError:
            raise
        except Exception as exc:
            raise RequestError(f"Failed to encode audio features: {exc}") from exc
        t1 = time.monotonic_ns()
        if req.visual is not None:
            return Prepared(req, self.view(req.visual), features, started_ns=t0,
                            audio_ns=t1 - t0, encoder_ns=encoder_ns, visual_ns=0)
        assert build_into is not None
        model.avatar.visual_inputs(background_indices(req), out=build_into)
        return Prepared(req, build_into, features, started_ns=t0, audio_ns=t1 - t0,
                        encoder_ns=encoder_ns, visual_ns=time.monotonic_ns() - t1)
