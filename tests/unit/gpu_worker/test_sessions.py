"""ONNX Runtime sessions of the gpu_worker (CPU EP) on the real demo graphs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from pipeline.demo.graphs import build_audio_encoder_model, build_unet_model
from pipeline.gpu_worker.sessions import AudioEncoder
from pipeline.gpu_worker.unet import load_unet
from pipeline.shm.segment import SHM_DIR, SharedSegment, segment_name

B = 2


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo UNet, a variant with renamed and reordered inputs, and the demo encoder."""
    root = tmp_path_factory.mktemp("graphs")
    unet = build_unet_model()
    variant = onnx.ModelProto()
    variant.CopyFrom(unet)
    renames = {"input": "visual_input", "audio": "audio_input"}
    inputs = list(variant.graph.input)
    for value in inputs:
        value.name = renames[value.name]
    del variant.graph.input[:]
    variant.graph.input.extend(reversed(inputs))  # audio first
    for node in variant.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    onnx.checker.check_model(variant)
    return {"unet": _save(unet, root / "unet.onnx"),
            "variant": _save(variant, root / "variant.onnx"),
            "encoder": _save(build_audio_encoder_model(), root / "encoder.onnx")}


@pytest.fixture(scope="module")
def inputs() -> tuple[np.ndarray, np.ndarray]:
    """A visual batch and audio features loud enough to open the demo mouth."""
    rng = np.random.default_rng(7)
    visual = rng.random((B, 6, 320, 320), dtype=np.float32)
    audio = np.zeros((B, 32, 16, 16), np.float32)
    audio[0] = 0.05
    audio[1] = 0.2
    return visual, audio


def _plain_run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _shm_name(tag: str) -> str:
    return segment_name(f"ut{os.getpid()}", tag)


# --- UNet -----------------------------------------------------------------------------------


def test_unet_reads_names_from_graph(graphs: dict[str, Path]) -> None:
    """The visual input is the 6-channel one, the audio input the other, the output the only one."""
    unet = load_unet(graphs["unet"], "cpu")
    assert (unet.visual_name, unet.audio_name, unet.output_name) == ("input", "audio", "output")
    assert unet.session.get_providers() == ["CPUExecutionProvider"]
    variant = load_unet(graphs["variant"], "cpu")
    assert [i.name for i in variant.session.get_inputs()] == ["audio_input", "visual_input"]
    assert (variant.visual_name, variant.audio_name) == ("visual_input", "audio_input")


def test_unet_runs_into_shared_memory(graphs: dict[str, Path],
                                      inputs: tuple[np.ndarray, np.ndarray]) -> None:
    """UNet.run reads from and writes into a real shared segment, equal to a plain session.run."""
    visual, audio = inputs
    expected = _plain_run(graphs["unet"], {"input": visual, "audio": audio})
    assert not np.allclose(expected, visual[:, :3]), "the audio should draw a mouth"
    unet = load_unet(graphs["unet"], "cpu")
    name = _shm_name("unet")
    sizes = [visual.nbytes, audio.nbytes, expected.nbytes]
    segment = SharedSegment.create(name, sum(sizes))
    try:
        shm_visual = segment.ndarray(0, visual.shape, np.float32)
        shm_audio = segment.ndarray(sizes[0], audio.shape, np.float32)
        out = segment.ndarray(sizes[0] + sizes[1], expected.shape, np.float32)
        shm_visual[:] = visual
        shm_audio[:] = audio
        out[:] = np.nan
        unet.run(shm_visual, shm_audio, out)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(shm_visual, visual)  # inputs are not written to
        del shm_visual, shm_audio, out
    finally:
        segment.close()
    assert not (SHM_DIR / name).exists()


def test_renamed_reordered_inputs_give_same_output(graphs: dict[str, Path],
                                                   inputs: tuple[np.ndarray, np.ndarray]) -> None:
    """A graph with inputs `visual_input`/`audio_input` in swapped order runs and gives the same output."""
    visual, audio = inputs
    out_a = np.empty((B, 3, 320, 320), np.float32)
    out_b = np.full((B, 3, 320, 320), np.nan, np.float32)
    load_unet(graphs["unet"], "cpu").run(visual, audio, out_a)
    load_unet(graphs["variant"], "cpu").run(visual, audio, out_b)
    np.testing.assert_array_equal(out_a, out_b)


def test_unet_rejects_non_contiguous_or_wrong_dtype(graphs: dict[str, Path],
                                                    inputs: tuple[np.ndarray, np.ndarray]) -> None:
    """Binding a non-contiguous or non-float32 array raises ValueError naming the tensor."""
    visual, audio = inputs
    unet = load_unet(graphs["unet"], "cpu")
    out = np.empty((B, 3, 320, 320), np.float32)
    with pytest.raises(ValueError, match="input: expected a C-contiguous float32 array"):
        unet.run(visual.astype(np.float64), audio, out)
    with pytest.raises(ValueError, match="audio: expected a C-contiguous float32 array"):
        unet.run(visual, np.asfortranarray(audio), out)
    with pytest.raises(ValueError, match="output: expected a C-contiguous float32 array"):
        unet.run(visual, audio, np.empty((B, 320, 320, 3), np.float32).transpose(0, 3, 1, 2))


def _graph(inputs: list[tuple[str, list[object]]], outputs: list[str]) -> onnx.ModelProto:
    """A tiny model: every output is Identity of the first input."""
    nodes = [helper.make_node("Identity", [inputs[0][0]], [o]) for o in outputs]
    graph = helper.make_graph(
        nodes, "bad",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("inputs, outputs", [
    ([("input", ["b", 6, 320, 320])], ["output"]),                                # one input
    ([("a", ["b", 3, 320, 320]), ("c", ["b", 32, 16, 16])], ["output"]),          # no 6-channel
    ([("a", ["b", 6, 320, 320]), ("c", ["b", 6, 320, 320])], ["output"]),         # two 6-channel
    ([("input", ["b", 6, 320, 320]), ("audio", ["b", 32, 16, 16])], ["o1", "o2"]),  # two outputs
])
def test_unet_rejects_wrong_contract(tmp_path: Path, inputs: list[tuple[str, list[object]]],
                                     outputs: list[str]) -> None:
    """A model without two inputs (one [B,6,...]) and one output is refused with its inputs named."""
    path = _save(_graph(inputs, outputs), tmp_path / "bad.onnx")
    with pytest.raises(ValueError, match=r"the model must have two inputs \(one \[B,6,320,320\]\) "
                                         r"and one output, got inputs \[\('") as info:
        load_unet(path, "cpu")
    assert inputs[0][0] in str(info.value)


def test_intra_op_threads_applied(graphs: dict[str, Path]) -> None:
    """intra_op_threads reaches the session options; 0 leaves ORT's default."""
    unet = load_unet(graphs["unet"], "cpu", intra_op_threads=2)
    assert unet.session.get_session_options().intra_op_num_threads == 2
    default = load_unet(graphs["unet"], "cpu")
    assert default.session.get_session_options().intra_op_num_threads == 0


# --- AudioEncoder ---------------------------------------------------------------------------


def test_encoder_zero_windows(graphs: dict[str, Path]) -> None:
    """Encoding no windows returns an empty (0, 512) float32 array without running the graph."""
    encoder = AudioEncoder.create(graphs["encoder"], "cpu")
    out = encoder.encode(np.zeros((0, 1, 80, 16), np.float32))
    assert out.shape == (0, 512) and out.dtype == np.float32


def test_encoder_batch_equals_per_window(graphs: dict[str, Path]) -> None:
    """Encoding N windows in one run equals encoding each window alone (and accepts float64)."""
    encoder = AudioEncoder.create(graphs["encoder"], "cpu")
    assert (encoder.input_name, encoder.output_name) == ("mel_spectrogram", "audio_features")
    rng = np.random.default_rng(3)
    windows = rng.uniform(-4, 4, (7, 1, 80, 16))
    windows[0] = -4.0  # silence encodes to exactly zero
    batched = encoder.encode(windows)
    assert batched.shape == (7, 512) and batched.dtype == np.float32
    single = np.concatenate([encoder.encode(windows[i:i + 1]) for i in range(7)])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    assert (batched[0] == 0).all() and (batched[1:] > 0).any()
    plain = _plain_run(graphs["encoder"], {"mel_spectrogram": windows.astype(np.float32)})
    np.testing.assert_allclose(batched, plain, rtol=1e-6, atol=1e-7)


def test_cuda_is_used_or_refused_never_a_silent_cpu_fallback(graphs: dict[str, Path]) -> None:
    """Asked for CUDA, a session runs on the CUDA EP or fails saying why; ONNX Runtime's own
    behaviour (fall back to the CPU without a word) would pass neither branch. Without a
    GPU or its libraries (CI) this is the refusal."""
    try:
        unet = load_unet(graphs["unet"], "cuda")
    except RuntimeError as exc:
        assert "the CUDA execution provider did not load" in str(exc)
        assert "gpus.provider: cpu" in str(exc)
        return
    assert unet.session.get_providers()[0] == "CUDAExecutionProvider"
