"""The OpenVINO backend of CPU workers on the real runtime: names from the graph, every batch
size from one compiled model, zero-copy runs on shared memory, its fidelity against ONNX
Runtime fp32 (f32 within 1e-4, bf16 composited frames >= 40 dB), and precision chosen by
what the CPU has, never bf16 without the units."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from pipeline.bench.unet import precision_check
from pipeline.demo.bench_model import bench_model_path, write_bench_model
from pipeline.demo.graphs import build_unet_model
from pipeline.gpu_worker.device import resolve_provider
from pipeline.gpu_worker.precision import max_abs_diff, resolve_precision
from pipeline.gpu_worker.unet import Backend, load_audio_encoder, load_unet
from pipeline.runtime.process import private_bytes
from pipeline.shm.segment import SharedSegment, segment_name
from pipeline.synctalk import AUDIO_SHAPE, PREDICTION_BYTES, PREDICTION_SHAPE, VISUAL_SHAPE
from tests.conftest import write_config

ov_runtime = pytest.importorskip("pipeline.gpu_worker.openvino_runtime",
                                 reason="the openvino package (the openvino extra) is not installed")
BF16 = ov_runtime.bf16_units()
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no bf16 units (AVX512-BF16/AMX)")


def _inputs(batch: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.random((batch, *VISUAL_SHAPE), np.float32),
            rng.standard_normal((batch, *AUDIO_SHAPE)).astype(np.float32))


def _run(unet, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
    out = np.full((len(visual), *PREDICTION_SHAPE), np.nan, np.float32)
    unet.run(visual, audio, out)
    return out


@pytest.fixture(scope="module")
def bench_unet(models_root: Path) -> Path:
    path = bench_model_path(models_root)
    if not path.is_file():
        write_bench_model(path)
    return path


@pytest.fixture(scope="module")
def bench_config(tmp_path_factory: pytest.TempPathFactory, models_root: Path,
                 bench_unet: Path) -> Path:
    """A config whose `bench` model is the SyncTalk-2D-sized UNet on the demo frames."""
    return write_config(tmp_path_factory.mktemp("ov") / "config.yaml", models_root, **{
        "models.bench": {"model_path": "bench/unet.onnx", "background_dir": "demo/frames",
                         "crop_rects_path": "demo/crop_rects.json", "num_frames": 10}})


def test_names_come_from_the_graph(tmp_path: Path) -> None:
    """Renamed and reordered inputs are found by shape, as on ONNX Runtime."""
    model = build_unet_model()
    renames = {"input": "visual_input", "audio": "audio_input"}
    inputs = list(model.graph.input)
    for value in inputs:
        value.name = renames[value.name]
    del model.graph.input[:]
    model.graph.input.extend(reversed(inputs))
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    path = tmp_path / "variant.onnx"
    onnx.save(model, str(path))
    unet = load_unet(path, "openvino", precision="fp32")
    assert (unet.visual_name, unet.audio_name, unet.output_name) == (
        "visual_input", "audio_input", "output")


def test_f32_equals_onnx_runtime_at_every_batch_size(bench_unet: Path) -> None:
    """One compiled model serves batches 2, 1 and 3 in any order, each within 1e-4 (max abs)
    of ONNX Runtime's float32 prediction on the SyncTalk-2D-sized UNet."""
    openvino = load_unet(bench_unet, "openvino", 2, "fp32")
    onnxruntime = load_unet(bench_unet, "cpu", 2, "fp32")
    for batch in (2, 1, 3):
        visual, audio = _inputs(batch, seed=batch)
        got, want = _run(openvino, visual, audio), _run(onnxruntime, visual, audio)
        assert not np.isnan(got).any()
        assert max_abs_diff(got, want) <= 1e-4, batch


def test_a_run_reads_and_writes_shared_memory_in_place(bench_unet: Path, instance: str) -> None:
    """Inputs are read from and the prediction written into a shared-memory segment: while
    it runs, the infer request's tensors are the segment's memory, not copies; after it,
    the request holds none of it (the segment can be unmapped at once)."""
    unet = load_unet(bench_unet, "openvino", 2, "fp32")
    batch = 2
    visual, audio = _inputs(batch)
    sizes = (visual.nbytes, audio.nbytes, batch * PREDICTION_BYTES)
    segment = SharedSegment.create(segment_name(instance, "ov"), sum(sizes))
    v = segment.ndarray(0, visual.shape, "float32")
    a = segment.ndarray(sizes[0], audio.shape, "float32")
    out = segment.ndarray(sizes[0] + sizes[1], (batch, *PREDICTION_SHAPE), "float32")
    v[...], a[...], out[...] = visual, audio, np.nan
    seen: list[bool] = []
    ports = [unet.visual_port, unet.audio_port, unet.output_port]  # type: ignore[attr-defined]
    addresses = [array.ctypes.data for array in (v, a, out)]
    request = unet.request  # type: ignore[attr-defined]
    infer = request.infer

    class Spy:  # the request, as the run calls it, checking its tensors at infer time
        def __getattr__(self, name: str) -> object:
            return getattr(request, name)

        def infer(self) -> None:
            seen.extend(request.get_tensor(port).data.ctypes.data == address
                        for port, address in zip(ports, addresses, strict=True))
            infer()

    unet.request = Spy()  # type: ignore[attr-defined]
    unet.run(v, a, out)
    assert seen == [True, True, True]
    assert not np.isnan(out).any()
    assert max_abs_diff(out, _run(unet, visual, audio)) == 0.0
    del v, a, out
    # SharedMemory.close() raises BufferError while anything (the request) still holds a view
    segment._shm.close()  # type: ignore[union-attr]
    segment.close()


def test_a_bad_array_is_refused_by_name(bench_unet: Path) -> None:
    """A non-contiguous or non-float32 input is a clear error, not a silent copy."""
    unet = load_unet(bench_unet, "openvino", 1, "fp32")
    visual, audio = _inputs(1)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        unet.run(visual.astype(np.float64), audio, np.empty((1, *PREDICTION_SHAPE), np.float32))
    with pytest.raises(ValueError, match="batch sizes differ"):
        unet.run(visual, audio, np.empty((2, *PREDICTION_SHAPE), np.float32))


def test_the_audio_encoder_equals_onnx_runtime(models_root: Path) -> None:
    """The encoder on OpenVINO (float32) gives ONNX Runtime's features within 1e-4, for N
    windows and for none."""
    path = models_root / "audio_encoder.onnx"
    windows = np.random.default_rng(1).uniform(-4, 4, (23, 1, 80, 16)).astype(np.float32)
    openvino, onnxruntime = load_audio_encoder(path, "openvino", 1), load_audio_encoder(path, "cpu", 1)
    assert max_abs_diff(openvino.encode(windows), onnxruntime.encode(windows)) <= 1e-4
    assert openvino.encode(windows[:0]).shape == (0, 512)


def test_f32_frames_equal_onnx_runtime_on_the_bench_model(bench_config: Path) -> None:
    """Through the real encoder and the avatar's own visual input, OpenVINO f32's
    predictions are within 1e-4 of ONNX Runtime fp32's."""
    result = precision_check(bench_config, "bench", "cpu", batch=2,
                             reference=("cpu", "fp32"), candidate=("openvino", "fp32"))
    assert result["prediction_max_abs_diff"] <= 1e-4, result
    assert result["psnr_db_min"] >= 60.0, result


def bf16_models(bench_config: Path) -> list[tuple[Path, str]]:
    """(config, model id) of every model the bf16 check runs on: the bench model, and the
    model named by LIPSYNC_FIDELITY_MODEL=CONFIG:MODEL_ID (e.g. an imported SyncTalk-2D
    avatar)."""
    models = [(bench_config, "bench")]
    if other := os.environ.get("LIPSYNC_FIDELITY_MODEL"):
        config, _, model_id = other.rpartition(":")
        models.append((Path(config), model_id))
    return models


@needs_bf16
def test_bf16_frames_within_40_db_of_onnx_runtime_fp32(bench_config: Path) -> None:
    """bf16's composited frames are >= 40 dB PSNR from ONNX Runtime fp32's (the bench model,
    and any model LIPSYNC_FIDELITY_MODEL names); its predictions do differ (bf16 ran)."""
    for config, model_id in bf16_models(bench_config):
        result = precision_check(config, model_id, "cpu", batch=2,
                                 reference=("cpu", "fp32"), candidate=("openvino", "bf16"))
        assert result["psnr_db_min"] >= 40.0, result
        assert result["prediction_max_abs_diff"] > 1e-4, result


def test_precision_follows_the_cpu_and_bf16_is_never_chosen_without_units() -> None:
    """auto: bf16 on OpenVINO only with bf16 units, else fp32; bf16 forced without the units,
    or on ONNX Runtime, is refused by name; fp32 is fp32 everywhere."""
    assert resolve_precision("auto", "openvino", bf16_units=True) == "bf16"
    assert resolve_precision("auto", "openvino", bf16_units=False) == "fp32"
    assert resolve_precision("fp32", "openvino", bf16_units=True) == "fp32"
    assert resolve_precision("bf16", "openvino", bf16_units=True) == "bf16"
    with pytest.raises(ValueError, match="no bf16 units"):
        resolve_precision("bf16", "openvino", bf16_units=False)
    for provider in ("cpu", "cuda"):
        assert resolve_precision("auto", provider) == "fp32"
        with pytest.raises(ValueError, match="bf16 is OpenVINO's"):
            resolve_precision("bf16", provider)
    with pytest.raises(ValueError, match="does not run"):
        resolve_precision("fp16", "openvino")
    # this machine's answer is its CPU's: the flags say whether the units are there
    flags = ov_runtime._cpu_flags()
    assert BF16 == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert Backend.of("openvino", "auto").precision == ("bf16" if BF16 else "fp32")
    assert not ov_runtime._cpu_has_bf16({"avx512f", "avx2"})


@needs_bf16
def test_bf16_really_runs_in_bf16(bench_unet: Path) -> None:
    """The precision asked for is the one compiled (OpenVINO's own default is not trusted
    either way): bf16 and f32 compile to those inference precisions and predict differently."""
    visual, audio = _inputs(1)
    f32 = load_unet(bench_unet, "openvino", 1, "fp32")
    bf16 = load_unet(bench_unet, "openvino", 1, "bf16")
    hint = "INFERENCE_PRECISION_HINT"
    assert str(f32.compiled.get_property(hint)) == "<Type: 'float32'>"  # type: ignore[attr-defined]
    assert str(bf16.compiled.get_property(hint)) == "<Type: 'bfloat16'>"  # type: ignore[attr-defined]
    assert max_abs_diff(_run(f32, visual, audio), _run(bf16, visual, audio)) > 1e-3


def test_auto_provider_picks_openvino_without_a_gpu() -> None:
    """gpus.provider auto on this GPU-less machine with openvino installed is OpenVINO;
    openvino asked for is OpenVINO."""
    from pipeline.gpu_worker.device import cuda_device_count

    if cuda_device_count():
        pytest.skip("a CUDA device is visible: auto picks CUDA")
    assert resolve_provider("auto", 1) == "openvino"
    assert resolve_provider("openvino", 1) == "openvino"
    assert resolve_provider("cpu", 1) == "cpu"


def test_unloaded_models_give_their_memory_back(bench_unet: Path) -> None:
    """Compiling and dropping the bench UNet three times (after a first) does not grow the
    process's private memory by one model's worth (49 MB of weights: memory is freed)."""
    from pipeline.runtime.process import release_free_heap

    def cycle() -> None:
        unet = load_unet(bench_unet, "openvino", 1, "fp32")
        unet.warm_up()
        del unet
        gc.collect()
        release_free_heap()

    cycle()
    before = private_bytes()
    for _ in range(3):
        cycle()
    assert private_bytes() - before < 40 * 2**20


def test_a_model_compiled_for_one_batch_size_predicts_the_same(tmp_path: Path) -> None:
    """The benchmarks' alternative to the dynamic batch (compiled per batch size) gives the
    dynamic model's prediction (within float32 rounding of other kernels)."""
    path = tmp_path / "unet.onnx"
    onnx.save(build_unet_model(), str(path))
    visual, audio = _inputs(2)
    static = ov_runtime.OpenVinoUNet(ov_runtime.compile_model(path, "fp32", 1, batch=2))
    dynamic = load_unet(path, "openvino", 1, "fp32")
    assert max_abs_diff(_run(static, visual, audio), _run(dynamic, visual, audio)) <= 1e-5
