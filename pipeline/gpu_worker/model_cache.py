"""The models a gpu_worker holds: each avatar's UNet session and decoded backgrounds, and
the backend they run on (provider, precision, threads: `backend`, re-planned by
`planner`), and the audio encoders they run with (each distinct one loaded once and
shared).

Loads run on the shell's loader thread (`load_finished`), never on the engine's; the
engine adopts the result when the `LoadFinished` comes back through its inbox, so a load
never blocks requests for other models. `loaded` is what heartbeats report: model id ->
measured bytes, replaced whole on every change, so the heartbeat thread reads it without
meeting a change mid-way.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import Config, ModelConfig
from pipeline.gpu_worker.device import DeviceMemory, Resolved
from pipeline.gpu_worker.mel import SILENCE
from pipeline.gpu_worker.threads import ThreadPlanner, worker_cores
from pipeline.gpu_worker.unet import Backend
from pipeline.runtime.addresses import Addresses
from pipeline.runtime.process import release_free_heap
from pipeline.synctalk import MEL_WINDOW_SHAPE

if TYPE_CHECKING:  # onnxruntime is imported only after the device is pinned
    from pipeline.gpu_worker.avatar import Avatar
    from pipeline.gpu_worker.device_compositor import DeviceBackgrounds, DeviceCompositor
    from pipeline.gpu_worker.unet import Encoder, UNetRunner

log = logging.getLogger(__name__)

# each load's backgrounds get a segment name of their own (process-wide: two caches of one
# process, as in tests, must not meet either)
_background_serial = itertools.count()


class AudioEncoders:
    """The audio encoders of a worker's models, one session per distinct file content (a
    copy of the shared encoder in a model's folder is the shared encoder), held while a
    model uses it. Acquired on the loader thread, released on the engine's."""

    def __init__(self, provider: Resolved, intra_op_threads: int) -> None:
        self.provider, self.intra_op_threads = provider, intra_op_threads
        self.lock = threading.Lock()
        self.held: dict[str, tuple[Encoder, int]] = {}  # content sha256: (session, users)

    def acquire(self, path: Path) -> tuple[Encoder, str]:
        """The encoder of `path`'s content (created and warmed on first use) and its key."""
        from pipeline.gpu_worker.unet import load_audio_encoder

        key = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        with self.lock:
            held = self.held.get(key)
            if held is not None:
                self.held[key] = (held[0], held[1] + 1)
                return held[0], key
        # created outside the lock: a release on the engine's thread never waits for it
        encoder = load_audio_encoder(path, self.provider, self.intra_op_threads)
        encoder.encode(np.full((1, *MEL_WINDOW_SHAPE), SILENCE, np.float32))  # allocates
        with self.lock:
            encoder, users = self.held.get(key, (encoder, 0))
            self.held[key] = (encoder, users + 1)
        return encoder, key

    def release(self, key: str) -> None:
        with self.lock:
            encoder, users = self.held[key]
            if users > 1:
                self.held[key] = (encoder, users - 1)
            else:
                del self.held[key]


@dataclass
class LoadedModel:
    config: ModelConfig
    unet: UNetRunner                    # replaced whole when its threads are re-planned
    avatar: Avatar
    memory_bytes: int                   # measured: device (or private) memory + backgrounds
    load_ns: int
    encoder: Encoder                    # the model's audio encoder, shared with others of it
    encoders: AudioEncoders
    encoder_key: str
    # compositor.device gpu: the backgrounds where the worker's paste reads them (device memory)
    device_backgrounds: DeviceBackgrounds | None = None

    def close(self) -> None:
        self.device_backgrounds = None  # the device's copy goes with its last reference
        self.avatar.close()
        self.encoders.release(self.encoder_key)


@dataclass(frozen=True)
class LoadFinished:
    """A load's outcome, put into the engine's inbox by whoever ran it."""

    model_id: str
    model: LoadedModel | None
    error: str = ""                     # the client-facing reason when `model` is None


@dataclass(frozen=True)
class UNetRebuilt:
    """A loaded model's UNet built again with the current threads (threads.py)."""

    model_id: str
    unet: UNetRunner | None
    threads: int
    error: str = ""


class LoadError(Exception):
    """A model failed to load; the message is the client-facing reason."""


class ModelCache:
    def __init__(self, cfg: Config, gpu_index: int, provider: Resolved) -> None:
        self.cfg = cfg
        self.index = gpu_index
        self.provider = provider
        self.memory = DeviceMemory(provider, gpu_index)
        gpus = cfg.gpus
        cpu = provider != "cuda"
        cores = worker_cores(gpus.count) if cpu else 0
        # ValueError for a precision this provider or CPU cannot run (checked at start)
        self.backend = Backend.of(provider, gpus.unet_precision,
                                  gpus.intra_op_threads or cores)
        self.planner = ThreadPlanner(cores, self.backend.threads,
                                     fixed=not cpu or gpus.intra_op_threads > 0)
        self.encoders = AudioEncoders(provider, self.backend.threads)
        # compositor.device gpu: this worker pastes and encodes its frames on its device
        # (DeviceError, saying what is missing, where it cannot: the worker does not start)
        self.compositor: DeviceCompositor | None = None
        if cfg.compositor.device == "gpu":
            from pipeline.gpu_worker.device_compositor import DeviceCompositor

            self.compositor = DeviceCompositor.create(provider, cfg.jpeg_quality)
        self.models: dict[str, LoadedModel] = {}
        self.loaded: dict[str, int] = {}

    def get(self, model_id: str) -> LoadedModel | None:
        return self.models.get(model_id)

    def load(self, config: ModelConfig) -> LoadedModel:
        """Sessions, backgrounds, one warm-up batch. Runs on the loader thread."""
        from pipeline.gpu_worker.avatar import load_avatar
        from pipeline.gpu_worker.cuda_graphs import CAPTURE_LOCK

        t0 = time.monotonic_ns()
        before = self.memory.used_bytes()
        with CAPTURE_LOCK:  # a CUDA graph capture on the compute loop must not meet these
            try:            # allocations (cuda_graphs.py)
                unet = self.build_unet(config)
            except Exception as exc:
                raise LoadError(f"failed to create inferencer: failed to create session: {exc}") from exc
            try:
                encoder, key = self.encoders.acquire(self.cfg.audio_encoder_of(config))
            except Exception as exc:
                raise LoadError(f"failed to create audio encoder: {exc}") from exc
        name = Addresses.of(self.cfg).background_arena(self.index, next(_background_serial))
        try:
            avatar = load_avatar(config, name)
        except Exception as exc:
            self.encoders.release(key)
            raise LoadError(f"Failed to get model data: {exc}") from exc
        on_device = None
        if self.compositor is not None:
            try:
                with CAPTURE_LOCK:
                    on_device = self.compositor.upload(avatar.frames())
            except Exception as exc:
                avatar.close()
                self.encoders.release(key)
                raise LoadError(f"Failed to copy the backgrounds to the device: {exc}") from exc
        # measured: the device's (or, on CPU, this process's private) memory growth over
        # the load (the backgrounds' device copy included), plus their shared-memory segment
        memory = max(0, self.memory.used_bytes() - before) + avatar.nbytes
        return LoadedModel(config, unet, avatar, memory, time.monotonic_ns() - t0, encoder,
                           self.encoders, key, on_device)

    def build_unet(self, config: ModelConfig) -> UNetRunner:
        """`config`'s UNet on the current backend, warm."""
        from pipeline.gpu_worker.unet import load_unet

        b = self.backend
        unet = load_unet(config.model_path, b.provider, b.threads, b.precision,
                         self.cfg.gpus.cuda_graphs)
        unet.warm_up()
        return unet

    def add(self, model: LoadedModel) -> None:
        self.models[model.config.model_id] = model
        self.loaded = {m: v.memory_bytes for m, v in self.models.items()}

    def unload(self, model_id: str) -> str | None:
        """Drop the model and give its memory back; the name of its backgrounds' segment
        (for the compositors to unmap), or None when it was not loaded."""
        model = self.models.pop(model_id, None)
        self.loaded = {m: v.memory_bytes for m, v in self.models.items()}
        if model is None:
            return None
        segment = model.avatar.segment.name
        model.close()
        del model
        release_free_heap()  # glibc keeps freed heap otherwise: load/unload would only grow
        return segment

    def close(self) -> None:
        for model in self.models.values():
            model.close()
        self.models, self.loaded = {}, {}


def load_finished(cache: ModelCache, config: ModelConfig) -> LoadFinished:
    """Load `config`'s model; the outcome, errors included, as the engine's inbox item."""
    try:
        return LoadFinished(config.model_id, cache.load(config))
    except Exception as exc:
        error = str(exc) if isinstance(exc, LoadError) else f"{type(exc).__name__}: {exc}"
        return LoadFinished(config.model_id, None, error)


def unet_rebuilt(cache: ModelCache, config: ModelConfig) -> UNetRebuilt:
    """`config`'s UNet built again with the cache's current threads, as an inbox item."""
    threads = cache.backend.threads
    try:
        return UNetRebuilt(config.model_id, cache.build_unet(config), threads)
    except Exception as exc:
        return UNetRebuilt(config.model_id, None, threads, f"{type(exc).__name__}: {exc}")
