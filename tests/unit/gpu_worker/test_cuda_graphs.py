"""The CUDA-graph UNet's logic that runs without a GPU: buckets, splitting, the copies in and
out of its static buffers (over host memory on the CPU EP), when it takes the capture lock,
and that the worker ignores the option on the CPU with a log line."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo.graphs import build_unet_model
from pipeline.gpu_worker.cuda_graphs import (
    BUCKETS,
    CAPTURE_LOCK,
    WARMUP_RUNS,
    GraphedUNet,
    bucket_for,
    split_frames,
)
from pipeline.gpu_worker.sessions import UNet, make_session
from pipeline.gpu_worker.unet import load_unet

SMALL = (1, 2, 4)  # buckets small enough for the demo UNet on a 2-core machine


@pytest.fixture(scope="module")
def unet_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("graphs") / "unet.onnx"
    path.write_bytes(build_unet_model().SerializeToString())
    return path


def _batch(frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.random((frames, 6, 320, 320), np.float32),
            rng.random((frames, 32, 16, 16), np.float32) * 0.3)


def test_bucket_is_the_smallest_that_holds_the_batch() -> None:
    """Each batch size maps to the smallest bucket at least as large; none beyond the largest."""
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 13, 17, 25, 32)] == \
        [1, 2, 4, 8, 8, 12, 16, 24, 32, 32]
    assert BUCKETS == tuple(sorted(BUCKETS)) and BUCKETS[-1] == 32
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        bucket_for(33)


def test_split_covers_every_frame_once() -> None:
    """A run larger than the largest bucket is cut into consecutive pieces of at most it."""
    assert list(split_frames(70, 32)) == [slice(0, 32), slice(32, 64), slice(64, 70)]
    assert list(split_frames(32, 32)) == [slice(0, 32)]
    assert list(split_frames(1, 32)) == [slice(0, 1)]


def test_padded_exact_and_split_batches_equal_plain_runs(unet_path: Path) -> None:
    """Through the static buffers (padded to a bucket, split past the largest) the predictions
    equal a plain run's, for fresh inputs each time (no stale rows)."""
    plain = load_unet(unet_path, "cpu")
    graphed = GraphedUNet(make_session(unet_path, "cpu", 0), device="cpu", buckets=SMALL)
    for frames in (1, 3, 4, 7, 3):
        visual, audio = _batch(frames, seed=frames * 10 + len(graphed.first_runs))
        expected = np.empty((frames, 3, 320, 320), np.float32)
        plain.run(visual, audio, expected)
        got = np.full_like(expected, np.nan)
        graphed.run(visual, audio, got)
        np.testing.assert_array_equal(got, expected)
    # 1 frame ran in bucket 1; 3, 4, 7 (as 4 + 3) and 3 in bucket 4, captured on its third
    me = threading.get_ident()
    assert graphed.first_runs == {(me, 1): 1, (me, 4): WARMUP_RUNS + 1}


def test_mismatched_or_non_float32_arrays_are_refused(unet_path: Path) -> None:
    """Batches of different sizes, or arrays the static copy cannot take as they are, fail."""
    graphed = GraphedUNet(make_session(unet_path, "cpu", 0), device="cpu", buckets=SMALL)
    visual, audio = _batch(2, seed=1)
    with pytest.raises(ValueError, match="batch sizes differ"):
        graphed.run(visual, audio[:1], np.empty((2, 3, 320, 320), np.float32))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        graphed.run(visual.astype(np.float64), audio, np.empty((2, 3, 320, 320), np.float32))


def test_only_a_buckets_first_runs_wait_for_the_capture_lock(unet_path: Path) -> None:
    """The warm-up runs and the capture of a bucket wait while another thread holds the lock
    (a session being created); once captured, its replays do not."""
    graphed = GraphedUNet(make_session(unet_path, "cpu", 0), device="cpu", buckets=SMALL)
    visual, audio = _batch(1, seed=3)
    out = np.empty((1, 3, 320, 320), np.float32)
    for _ in range(WARMUP_RUNS + 1):
        graphed.run(visual, audio, out)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with CAPTURE_LOCK:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        graphed.run(visual, audio, out)  # captured bucket: does not wait
        waiter = threading.Thread(target=graphed.run, args=(*_batch(2, seed=4),
                                                            np.empty((2, 3, 320, 320), np.float32)))
        waiter.start()  # bucket 2 is new: its first run waits for the lock
        waiter.join(0.5)
        assert waiter.is_alive()
    finally:
        release.set()
        holder.join()
    waiter.join(10)
    assert not waiter.is_alive()


def test_warm_up_runs_no_capture(unet_path: Path) -> None:
    """The loader's warm-up runs outside any graph: it counts toward no bucket's capture."""
    graphed = GraphedUNet(make_session(unet_path, "cpu", 0), device="cpu", buckets=SMALL)
    graphed.warm_up()
    assert graphed.first_runs == {}


def test_cpu_worker_ignores_cuda_graphs_with_a_log_line(
        unet_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On the CPU provider gpus.cuda_graphs gives a plain UNet and says why, never an error."""
    with caplog.at_level(logging.WARNING, logger="pipeline.gpu_worker.sessions"):
        unet = load_unet(unet_path, "cpu", cuda_graphs=True)
    assert type(unet) is UNet
    assert "gpus.cuda_graphs ignored" in caplog.text and "CPU" in caplog.text
