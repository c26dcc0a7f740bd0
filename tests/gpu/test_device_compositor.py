"""compositor.device gpu on the device: the paste graphs run every node on the provider, the
worker's device compositor (backgrounds in device memory, nvImageCodec's CUDA encoder) makes
the compositors' frames within JPEG loss, what it costs per frame on the device and on the
host's CPU against the compositors' paste + JPEG, and a server with the setting answers a
batch whose frames equal the CPU reference."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.bench.local_server import ServerProcess
from pipeline.client import build_request, channel, speech_like_audio
from pipeline.compositor.composite import paste
from pipeline.compositor.jpeg_splice import encode_jpeg
from pipeline.gpu_worker.avatar import load_avatar
from pipeline.gpu_worker.device_compositor import DeviceCompositor
from pipeline.gpu_worker.paste_graph import MODES
from pipeline.gpu_worker.precision import psnr_db
from pipeline.gpu_worker.sessions import nodes_by_provider
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from pipeline.shm.segment import segment_name
from tests.conftest import write_config
from tests.gpu.support import BACKGROUNDS, ON_CPU, SIZES, decode, reference_frames, requires_gpu

pytestmark = requires_gpu
SAME_FRAME_DB = 45.0
QUALITY = 75
# SyncTalk-2D rects on the 1280x720 demo frames: the face crop, downscaled, every edge
RECTS = [(540, 300, 713, 489), (500, 300, 692, 492), (0, 0, 400, 360), (880, 360, 1280, 720)]


@pytest.fixture(scope="module")
def compositor(provider: str) -> DeviceCompositor:
    """The worker's device compositor on the provider (it passed its self-check)."""
    return DeviceCompositor.create(provider, QUALITY)  # type: ignore[arg-type]


def test_every_node_of_the_paste_graphs_runs_on_the_provider(
        compositor: DeviceCompositor, provider: str) -> None:
    """Both paste graphs (synctalk, stretch) run all their nodes on the provider."""
    ep = "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"
    for mode, session in compositor.sessions.items():
        assert session.get_providers()[0] == ep, mode
        nodes = nodes_by_provider(session)
        others = {name: found[:5] for name, found in nodes.items() if name != ep}
        assert nodes and not others, f"{mode}: nodes off {ep}: {others}"


def test_device_frames_equal_the_compositors_and_what_each_costs(
        compositor: DeviceCompositor, gpu_config: Path, provider: str,
        record_property: pytest.RecordProperty) -> None:
    """A batch of the demo avatar's frames pasted and encoded on the device decodes to the
    compositors' frames (paste + OpenCV JPEG) to >= 45 dB in both modes; the wall and CPU
    milliseconds per frame of each path are recorded (CPU ms per frame = cores per 1,000
    frames/s)."""
    from pipeline.config import load_config

    model = load_config(gpu_config).models["bench"]
    avatar = load_avatar(model, segment_name(f"gpucomp{os.getpid()}", "bg"))
    try:
        frames_np = avatar.frames()
        uploaded = compositor.upload(frames_np)
        batch = max(SIZES.batch, len(RECTS))
        indices = [i % BACKGROUNDS for i in range(batch)]
        rects = [RECTS[i % len(RECTS)] for i in range(batch)]
        prediction = np.random.default_rng(11).random((batch, 3, 320, 320), dtype=np.float32)
        for mode in MODES:
            compositor.composite(uploaded, indices, rects, prediction, mode)  # warm
            wall0, cpu0 = time.perf_counter(), time.process_time()
            done = compositor.composite(uploaded, indices, rects, prediction, mode)
            device_ms = (time.perf_counter() - wall0) * 1e3 / batch
            device_cpu_ms = (time.process_time() - cpu0) * 1e3 / batch
            wall0, cpu0 = time.perf_counter(), time.process_time()
            expected = [encode_jpeg(paste(frames_np[f], prediction[i], rects[i], mode), QUALITY)
                        for i, f in enumerate(indices)]
            cpu_path_ms = (time.perf_counter() - wall0) * 1e3 / batch
            cpu_path_cpu_ms = (time.process_time() - cpu0) * 1e3 / batch
            worst = min(psnr_db(decode(e), decode(g)) for e, g in zip(expected, done.jpegs, strict=True))
            for key, value in (("device_ms_per_frame", device_ms),
                               ("device_cpu_ms_per_frame", device_cpu_ms),
                               ("device_paste_ms_per_frame", done.paste_ns / 1e6 / batch),
                               ("device_jpeg_ms_per_frame", done.jpeg_ns / 1e6 / batch),
                               ("compositor_ms_per_frame", cpu_path_ms),
                               ("compositor_cpu_ms_per_frame", cpu_path_cpu_ms),
                               ("worst_frame_psnr_db", min(worst, 200.0))):
                record_property(f"{mode}_{key}", round(value, 3))
            assert worst >= SAME_FRAME_DB, (mode, worst)
    finally:
        avatar.close()


@pytest.fixture(scope="module")
def device_server(tmp_path_factory: pytest.TempPathFactory, models_root: Path, bench_model: Path,
                  provider: str) -> Iterator[tuple[ServerProcess, Path]]:
    """`lipsync serve` with compositor.device gpu and the bench model preloaded."""
    spec = {"model_path": str(bench_model.relative_to(models_root)),
            "background_dir": "demo/frames", "crop_rects_path": "demo/crop_rects.json",
            "num_frames": BACKGROUNDS, "preload_model": True}
    tmp = tmp_path_factory.mktemp("gpu-compositor")
    config = write_config(tmp / "config.yaml", models_root, **{
        "gpus.provider": provider, "batching.max_batch_frames": 32,
        "runtime.arena_mb": 512 if ON_CPU else 1024, "compositor.pool_size": 1,
        "compositor.device": "gpu", "models": {"bench": spec}})
    with ServerProcess(config, log_path=tmp / "server.log") as server:
        yield server, config


def test_a_server_compositing_on_the_device_answers_the_cpu_frames(
        device_server: tuple[ServerProcess, Path], record_property: pytest.RecordProperty) -> None:
    """A batch request to a server with compositor.device gpu gives 1280x720 frames equal
    to the CPU reference (CPU UNet, the compositor's paste and JPEG) to >= 45 dB."""
    server, config = device_server
    req = build_request(config, "bench", SIZES.batch, 5, client_visual=False)
    req.raw_audio = speech_like_audio((SIZES.batch + 15) * 0.04, seed=32).tobytes()
    ch = channel(server.address)
    with ch:
        resp = pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(req, timeout=120)
    assert resp.success, resp.error
    got = [decode(jpeg) for jpeg in resp.composited_frames]
    expected = reference_frames(config, "bench", req.raw_audio, SIZES.batch, start=5)
    assert all(frame.shape == (720, 1280, 3) for frame in got)
    worst = min(psnr_db(e, g) for e, g in zip(expected, got, strict=True))
    for key in ("unet_ms", "paste_ms", "jpeg_ms", "composite_critical_ms"):
        record_property(key, round(getattr(resp.stages, key), 2))
    record_property("worst_frame_psnr_db", round(min(worst, 200.0), 2))
    assert worst >= SAME_FRAME_DB
