"""The fp16 UNet option on the CPU provider: the conversion keeps the I/O float32, the CPU EP
runs the converted graph (float32 kernels between ORT's inserted Casts), and on the bench
model its composited frames stay within 40 dB of fp32's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from pipeline.bench.unet import precision_check
from pipeline.demo.bench_model import bench_model_path, build_bench_unet, write_bench_model
from pipeline.gpu_worker.precision import convert_to_fp16, max_abs_diff, psnr_db, unet_model
from pipeline.gpu_worker.unet import load_unet
from tests.conftest import write_config


@pytest.fixture(scope="module")
def bench_config(tmp_path_factory: pytest.TempPathFactory, models_root: Path) -> Path:
    """A config whose `bench` model is the SyncTalk-2D-sized UNet on the demo frames."""
    path = bench_model_path(models_root)
    if not path.is_file():
        write_bench_model(path)
    return write_config(tmp_path_factory.mktemp("fp16") / "config.yaml", models_root, **{
        "models.bench": {"model_path": "bench/unet.onnx", "background_dir": "demo/frames",
                         "crop_rects_path": "demo/crop_rects.json", "num_frames": 10}})


def test_conversion_keeps_io_float32_and_computes_in_float16() -> None:
    """Weights become float16, inputs and output stay float32 (shared memory is unchanged)."""
    model = convert_to_fp16(build_bench_unet())
    io = [*model.graph.input, *model.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {TensorProto.FLOAT}
    weights = [t for t in model.graph.initializer if t.name.endswith(".weight")]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    # the converter's default block list keeps Resize in float32, behind Casts
    assert {n.op_type for n in model.graph.node} >= {"Conv", "Cast", "Resize"}
    onnx.checker.check_model(model)


def test_fp16_unet_runs_on_the_cpu_provider_close_to_fp32(bench_config: Path,
                                                          models_root: Path) -> None:
    """load_unet(precision=fp16) runs on the CPU EP; its predictions differ from fp32 by
    float16 rounding only (nonzero, well under 0.1)."""
    path = bench_model_path(models_root)
    rng = np.random.default_rng(5)
    visual = rng.random((1, 6, 320, 320), np.float32)
    audio = rng.standard_normal((1, 32, 16, 16)).astype(np.float32)
    outs = {}
    for precision in ("fp32", "fp16"):
        unet = load_unet(path, "cpu", precision=precision)
        assert unet.session.get_providers() == ["CPUExecutionProvider"]
        outs[precision] = np.empty((1, 3, 320, 320), np.float32)
        unet.run(visual, audio, outs[precision])
    assert 0 < max_abs_diff(outs["fp32"], outs["fp16"]) < 0.1


def test_bench_model_fp16_frames_within_40_db(bench_config: Path) -> None:
    """On the bench model's composited frames fp16 is >= 40 dB PSNR from fp32; the
    prediction max abs diff is reported."""
    result = precision_check(bench_config, "bench", "cpu", batch=2)
    assert result["provider"] == "cpu" and result["batch"] == 2
    assert result["psnr_db_min"] >= 40.0, result
    assert 0 < result["prediction_max_abs_diff"] < 0.1


def test_precision_names() -> None:
    """fp32 and tf32 load the file itself; an unknown precision is refused by name."""
    path = Path("unet.onnx")
    assert unet_model(path, "fp32") == path and unet_model(path, "tf32") == path
    with pytest.raises(ValueError, match="unknown UNet precision 'fp8'"):
        unet_model(path, "fp8")


def test_psnr() -> None:
    """PSNR: inf for identical images, 20*log10(255/e) for a uniform error e."""
    a = np.full((4, 4, 3), 100, np.uint8)
    assert psnr_db(a, a) == float("inf")
    assert psnr_db(a, a + np.uint8(5)) == pytest.approx(20 * np.log10(255 / 5))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_db(a, a[:2])
