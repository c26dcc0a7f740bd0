"""fp16 against fp32 on the device, and CUDA-graph replays against plain runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.bench.unet import precision_check
from pipeline.gpu_worker.cuda_graphs import GraphedUNet
from pipeline.gpu_worker.precision import max_abs_diff
from pipeline.gpu_worker.sessions import make_session
from pipeline.gpu_worker.unet import load_unet
from tests.gpu.support import SIZES, requires_gpu

pytestmark = requires_gpu


def test_fp16_frames_are_within_40_db_of_fp32(
        gpu_config: Path, provider: str, record_property: pytest.RecordProperty) -> None:
    """The fp16 UNet's composited frames are >= 40 dB PSNR from the fp32 ones on the device."""
    result = precision_check(gpu_config, "bench", provider, SIZES.precision_batch)
    for key, value in result.items():
        record_property(key, value)
    assert result["provider"] == provider and result["batch"] == SIZES.precision_batch
    assert result["psnr_db_min"] >= 40.0, result


def test_cuda_graph_replays_equal_plain_runs(bench_model: Path, provider: str) -> None:
    """Exact, padded and split batches replayed from graphs give the plain predictions, and
    a replay with new inputs gives the new predictions (no stale graph output)."""
    plain = load_unet(bench_model, provider)
    if provider == "cuda":
        graphed = load_unet(bench_model, provider, cuda_graphs=True)
        assert isinstance(graphed, GraphedUNet)
    else:  # the dry run: the same class over host buffers (ORT ignores gpu_graph_id there)
        graphed = GraphedUNet(make_session(bench_model, "cpu", 0), device="cpu")
    for batch in SIZES.graph_batches:
        for seed in (batch, batch + 100):
            rng = np.random.default_rng(seed)
            visual = rng.random((batch, 6, 320, 320), np.float32)
            features = rng.standard_normal((batch, 32, 16, 16)).astype(np.float32)
            expected = np.empty((batch, 3, 320, 320), np.float32)
            plain.run(visual, features, expected)
            got = np.full_like(expected, np.nan)
            graphed.run(visual, features, got)
            assert max_abs_diff(expected, got) <= 1e-3, (batch, seed)
