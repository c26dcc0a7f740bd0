"""UNet and audio encoder on device memory (IO binding of device OrtValues) compute what the
CPU provider computes, and a batch's frames do not depend on what else is in the batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pipeline.client import speech_like_audio
from pipeline.gpu_worker import audio
from pipeline.gpu_worker import mel as mel_math
from pipeline.gpu_worker.precision import max_abs_diff
from pipeline.gpu_worker.sessions import ENCODED_DIM, AudioEncoder
from pipeline.gpu_worker.unet import load_unet
from tests.gpu.support import SIZES, requires_gpu

pytestmark = requires_gpu
FP32_TOLERANCE = 1e-3


def _inputs(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.random((batch, 6, 320, 320), np.float32),
            rng.standard_normal((batch, 32, 16, 16)).astype(np.float32))


def _on_device(session: ort.InferenceSession, feeds: dict[str, np.ndarray], output: str,
               shape: list[int], device: str) -> np.ndarray:
    """One run with every input and the output bound to OrtValues in `device` memory."""
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    result = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, device, 0)
    assert result.device_name().lower() == device
    binding.bind_ortvalue_output(output, result)
    session.run_with_iobinding(binding)
    return result.numpy()


def test_unet_on_device_memory_matches_the_cpu_provider(
        bench_model: Path, provider: str, record_property: pytest.RecordProperty) -> None:
    """fp32 UNet predictions from device memory and from host arrays equal the CPU's (<= 1e-3)."""
    cpu, dev = load_unet(bench_model, "cpu"), load_unet(bench_model, provider)
    for batch in SIZES.unet_batches:
        visual, features = _inputs(batch, seed=batch)
        expected = np.empty((batch, 3, 320, 320), np.float32)
        cpu.run(visual, features, expected)
        bound = _on_device(dev.session, {dev.visual_name: visual, dev.audio_name: features},
                           dev.output_name, [batch, 3, 320, 320], provider)
        from_host = np.full_like(expected, np.nan)
        dev.run(visual, features, from_host)  # the worker's path: shared-memory arrays
        record_property(f"unet_b{batch}_max_abs_diff", max_abs_diff(expected, bound))
        assert max_abs_diff(expected, bound) <= FP32_TOLERANCE
        assert max_abs_diff(expected, from_host) <= FP32_TOLERANCE


def test_encoder_on_device_memory_matches_the_cpu_provider(
        models_root: Path, provider: str, record_property: pytest.RecordProperty) -> None:
    """Audio features of real speech windows from device memory equal the CPU's (<= 1e-3)."""
    windows = audio.mel_windows(mel_math.melspectrogram(speech_like_audio(2.0)))
    path = models_root / "audio_encoder.onnx"
    expected = AudioEncoder.create(path, "cpu").encode(windows)
    dev = AudioEncoder.create(path, provider)
    got = _on_device(dev.session, {dev.input_name: windows}, dev.output_name,
                     [len(windows), ENCODED_DIM], provider)
    record_property("encoder_max_abs_diff", max_abs_diff(expected, got))
    assert max_abs_diff(expected, got) <= FP32_TOLERANCE
    assert max_abs_diff(expected, dev.encode(windows)) <= FP32_TOLERANCE


def test_frames_do_not_depend_on_their_batch(bench_model: Path, provider: str) -> None:
    """Frames run in one batch equal the same frames run in two smaller ones (<= 1e-3)."""
    unet = load_unet(bench_model, provider)
    first, second = SIZES.split
    visual, features = _inputs(first + second, seed=7)
    together = np.empty((first + second, 3, 320, 320), np.float32)
    unet.run(visual, features, together)
    apart = np.empty_like(together)
    unet.run(visual[:first], features[:first], apart[:first])
    unet.run(visual[first:], features[first:], apart[first:])
    assert max_abs_diff(together, apart) <= FP32_TOLERANCE
