"""The CUDA execution provider loads and runs every node: no silent CPU fallback."""
from __future__ import annotations

from pathlib import Path

from pipeline.gpu_worker.device import openvino_installed, resolve_provider
from pipeline.gpu_worker.sessions import AudioEncoder, nodes_by_provider
from pipeline.gpu_worker.unet import load_unet
from tests.gpu.support import requires_gpu

pytestmark = requires_gpu


def _ep(provider: str) -> str:
    return "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"


def test_auto_resolves_to_the_device(provider: str) -> None:
    """gpus.provider auto picks CUDA where ONNX Runtime has the CUDA EP and NVML a device
    (in the CPU dry run: the CPU workers' provider, OpenVINO when it is installed)."""
    expected = provider
    if provider == "cpu" and openvino_installed():
        expected = "openvino"
    assert resolve_provider("auto", 1) == expected


def test_every_node_of_unet_and_encoder_runs_on_the_provider(
        bench_model: Path, models_root: Path, provider: str) -> None:
    """The fp32 and fp16 UNet and the audio encoder run all their nodes on the provider."""
    sessions = {"unet fp32": load_unet(bench_model, provider).session,
                "unet fp16": load_unet(bench_model, provider, precision="fp16").session,
                "encoder": AudioEncoder.create(models_root / "audio_encoder.onnx",
                                               provider).session}
    for name, session in sessions.items():
        assert session.get_providers()[0] == _ep(provider), name
        nodes = nodes_by_provider(session)
        others = {ep: found[:5] for ep, found in nodes.items() if ep != _ep(provider)}
        assert nodes and not others, f"{name}: nodes off {_ep(provider)}: {others}"
