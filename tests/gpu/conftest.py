"""Fixtures of the GPU tests: the provider, the bench model and one server on the device."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.bench.local_server import ServerProcess
from pipeline.demo.assets import build_demo_assets
from pipeline.demo.bench_model import bench_model_path, write_bench_model
from tests.conftest import write_config
from tests.gpu.support import BACKGROUNDS, ON_CPU


@pytest.fixture(scope="session")
def provider() -> str:
    """cuda on the GPU box; cpu only in the suite's dry run."""
    return "cpu" if ON_CPU else "cuda"


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo assets with BACKGROUNDS frames (all these tests use) and the SyncTalk-2D-sized
    bench UNet beside them."""
    root = tmp_path_factory.mktemp("gpu-models")
    build_demo_assets(root, num_frames=BACKGROUNDS)
    write_bench_model(bench_model_path(root))
    return root


@pytest.fixture(scope="session")
def bench_model(models_root: Path) -> Path:
    """The bench UNet's path."""
    return bench_model_path(models_root)


@pytest.fixture(scope="session")
def gpu_config(tmp_path_factory: pytest.TempPathFactory, models_root: Path, bench_model: Path,
               provider: str) -> Path:
    """The bench model preloaded on the provider (never `auto`: no silent CPU fallback),
    coalescing on, and a second model of the same files for load/unload cycles."""
    spec = {"model_path": str(bench_model.relative_to(models_root)),
            "background_dir": "demo/frames", "crop_rects_path": "demo/crop_rects.json",
            "num_frames": BACKGROUNDS}
    return write_config(tmp_path_factory.mktemp("gpu") / "config.yaml", models_root, **{
        "gpus.provider": provider, "batching.max_batch_frames": 32,
        "batching.max_queue_delay_ms": 200, "runtime.arena_mb": 512 if ON_CPU else 1024,
        "compositor.pool_size": 2 if ON_CPU else 6,
        "models": {"bench": {**spec, "preload_model": True}, "cycle": spec}})


@pytest.fixture(scope="session")
def gpu_server(gpu_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`lipsync serve` with gpu_config, shared by the tests that need a server."""
    log = tmp_path_factory.mktemp("gpu-server") / "server.log"
    with ServerProcess(gpu_config, log_path=log) as server:
        yield server
