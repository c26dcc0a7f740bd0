"""SyncTalk-2D's networks from one layout: a trained state dict folds into the same graph the
bench model is, every key and shape is checked, and other audio modes are named."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from pipeline.bench.training_run import bench_unet_state_dict, encoder_state_dict
from pipeline.demo.bench_model import build_bench_unet
from pipeline.networks.builder import ArchitectureError, ConvKey, StateDictWeights
from pipeline.networks.synctalk2d import encoder_from_state_dict, unet_from_state_dict


@pytest.fixture(scope="module")
def trained() -> dict[str, np.ndarray]:
    """The bench model's weights as unet_328's state dict (identity BatchNorms)."""
    return bench_unet_state_dict()


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_state_dict_builds_the_bench_models_graph(trained: dict[str, np.ndarray]) -> None:
    """Importing the bench model's own state dict gives the bench model: the same nodes with
    the same attributes, and the same weights (to float32 rounding of the folding)."""
    bench, imported = build_bench_unet(), unet_from_state_dict(trained, "")
    assert [(n.op_type, list(n.input), list(n.output), list(n.attribute))
            for n in imported.graph.node] == [
        (n.op_type, list(n.input), list(n.output), list(n.attribute)) for n in bench.graph.node]
    bench_weights = {t.name: numpy_helper.to_array(t) for t in bench.graph.initializer}
    imported_weights = {t.name: numpy_helper.to_array(t) for t in imported.graph.initializer}
    assert imported_weights.keys() == bench_weights.keys()
    for name, value in bench_weights.items():
        np.testing.assert_allclose(imported_weights[name], value, rtol=1e-6, atol=1e-9,
                                   err_msg=name)


def test_batchnorm_is_folded_into_the_convolution() -> None:
    """A Conv2d with bias and a trained BatchNorm after it become one convolution:
    W'x + b' = gamma (Wx + b - mean) / sqrt(var + eps) + beta."""
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(4, 3, 1, 1)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    gamma, beta, mean = (rng.normal(size=4).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.1, 2.0, size=4).astype(np.float32)
    weights = StateDictWeights({"c.weight": w, "c.bias": b, "n.weight": gamma, "n.bias": beta,
                                "n.running_mean": mean, "n.running_var": var}, "test")
    folded_w, folded_b = weights.conv(ConvKey("c", "n", bias=True), (4, 3, 1, 1), 1.0)
    x = rng.normal(size=3)
    want = gamma * (w[:, :, 0, 0] @ x + b - mean) / np.sqrt(var + 1e-5) + beta
    np.testing.assert_allclose(folded_w[:, :, 0, 0] @ x + folded_b, want, rtol=1e-5)
    weights.check_all_used()


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t.pop("down3.maxpool_conv.0.double_conv.1.conv.4.running_var"),
     "missing key 'down3.maxpool_conv.0.double_conv.1.conv.4.running_var' (shape [256])"),
    (lambda t: t.update({"up2.conv.double_conv.0.conv.0.weight": np.zeros((512, 384, 1, 1),
                                                                            np.float32)}),
     "key 'up2.conv.double_conv.0.conv.0.weight' has shape [512, 384, 1, 1], SyncTalk-2D "
     "unet_328 ('ave' audio mode) has [512, 256, 1, 1]"),
    (lambda t: t.update({"extra.weight": np.zeros(3, np.float32)}),
     "unexpected key 'extra.weight': not part of SyncTalk-2D unet_328"),
    (lambda t: t.update({"outc.conv.bias": np.array([np.nan, 0, 0], np.float32)}),
     "key 'outc.conv.bias' holds NaN or infinite values"),
    (lambda t: t.update({"audio_model.conv1.conv.0.weight": np.zeros((512, 256, 1, 1),
                                                                      np.float32)}),
     "a 'wenet' checkpoint (audio_model.conv1 takes 256 channels): only SyncTalk-2D unet_328 "
     "('ave' audio mode) is served"),
    (lambda t: t.update({"audio_model.conv1.conv.0.weight": np.zeros((24, 12, 1, 1),
                                                                      np.float32)}),
     "a 'whisper' checkpoint"),
])
def test_a_state_dict_that_does_not_fit_names_its_first_bad_key(
        trained: dict[str, np.ndarray], change, message: str) -> None:
    """A missing key, a wrong shape, an unexpected key, non-finite weights, another audio
    mode: one line naming the key (or the mode)."""
    tensors = dict(trained)
    change(tensors)
    with pytest.raises(ArchitectureError) as info:
        unet_from_state_dict(tensors, "")
    assert message in str(info.value)


def test_the_two_checkpoints_are_told_apart(trained: dict[str, np.ndarray]) -> None:
    """An encoder's state dict given as the UNet, or a UNet's as the encoder, says which it is."""
    with pytest.raises(ArchitectureError, match="an audio encoder's state dict, not"):
        unet_from_state_dict(encoder_state_dict(), "")
    with pytest.raises(ArchitectureError, match="a UNet's state dict, not"):
        encoder_from_state_dict(trained, "")


def test_the_encoder_maps_mel_windows_to_512_features() -> None:
    """The encoder built from a state dict (with or without its "audio_encoder." prefix)
    takes [N,1,80,16] mel windows to [N,512], N from 1 to many, the same either way."""
    tensors = encoder_state_dict()
    plain = _session(encoder_from_state_dict(tensors, ""))
    prefixed = _session(encoder_from_state_dict(
        {f"audio_encoder.{k}": v for k, v in tensors.items()}, ""))
    mel = np.random.default_rng(2).uniform(-4, 4, (5, 1, 80, 16)).astype(np.float32)
    (out,) = plain.run(None, {"mel_spectrogram": mel})
    assert out.shape == (5, 512) and np.isfinite(out).all() and (out >= 0).all()
    np.testing.assert_array_equal(prefixed.run(None, {"mel_spectrogram": mel})[0], out)
    np.testing.assert_allclose(plain.run(None, {"mel_spectrogram": mel[2:3]})[0], out[2:3],
                               rtol=1e-5, atol=1e-6)
