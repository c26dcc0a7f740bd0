"""InferBatchComposite request validation: check order, exact error strings, NaN/Inf, sample rate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config, parse_config
from pipeline.frontend.validation import (
    InferInput,
    InvalidRequest,
    copy_finite_visual,
    validate,
)
from pipeline.frontend.wire import CompositeRequestView, parse_composite_request
from pipeline.rpc import monolithic_pb2 as pb

FRAME_FLOATS = 6 * 320 * 320
FEATURE_FLOATS = 32 * 16 * 16


@pytest.fixture(scope="module")
def cfg() -> Config:
    raw = {"models": {"demo": {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
                               "crop_rects_path": "demo/crop_rects.json", "num_frames": 10}}}
    return parse_config(raw, base_dir=Path("/srv/lipsync"))


def _visual(batch: int, value: float = 0.5) -> bytes:
    return np.full(batch * FRAME_FLOATS, value, "<f4").tobytes()


def _audio(samples: int = 10240, value: float = 0.1) -> bytes:
    return np.full(samples, value, "<f4").tobytes()


def _request(**fields: object) -> CompositeRequestView:
    """A valid request for model demo, batch 1, with the given fields replaced, read from
    its wire bytes as the server reads it."""
    base: dict[str, object] = {"model_id": "demo", "batch_size": 1, "visual_frames": _visual(1),
                               "raw_audio": _audio(), "start_frame_idx": 0}
    base.update(fields)
    wire = pb.CompositeBatchRequest(**base).SerializeToString()  # type: ignore[arg-type]
    return parse_composite_request(wire)


def _error(req: CompositeRequestView, cfg: Config) -> str:
    with pytest.raises(InvalidRequest) as info:
        validate(req, cfg)
    return str(info.value)


def test_first_fault_in_order_is_reported(cfg: Config) -> None:
    """Faults are reported in order: model_id, batch_size, visual size, audio, model, start index."""
    fields: dict[str, object] = {"model_id": "", "batch_size": 0, "visual_frames": b"\x00",
                                 "raw_audio": b"", "start_frame_idx": -1}
    fixes: list[tuple[str, object, str]] = [
        ("model_id", "ghost", "model_id is required"),
        ("batch_size", 2, "batch_size must be 1-32, got 0"),
        ("visual_frames", _visual(2),
         "Invalid visual frames size: got 1 bytes, expected 4915200 bytes"),
        ("raw_audio", _audio(), "Either raw_audio or audio_features must be provided"),
        ("model_id", "demo", "Model 'ghost' not found in configuration"),
        ("start_frame_idx", 3, "start_frame_idx must be >= 0, got -1"),
    ]
    for key, fix, message in fixes:
        assert _error(pb.CompositeBatchRequest(**fields), cfg) == message  # type: ignore[arg-type]
        fields[key] = fix
    valid = validate(pb.CompositeBatchRequest(**fields), cfg)  # type: ignore[arg-type]
    assert (valid.model_id, valid.batch_size, valid.start_frame_idx) == ("demo", 2, 3)


def test_audio_faults_come_before_model_config(cfg: Config) -> None:
    """A bad audio field is reported even when the model is also unknown (audio is checked first)."""
    req = _request(model_id="ghost", raw_audio=b"\x00" * 6)
    assert _error(req, cfg).startswith("Invalid raw audio size")


@pytest.mark.parametrize("batch", [0, -1, 33, 1000])
def test_batch_size_range(cfg: Config, batch: int) -> None:
    """batch_size outside 1-32 is rejected with the original's message."""
    assert _error(_request(batch_size=batch), cfg) == f"batch_size must be 1-32, got {batch}"


@pytest.mark.parametrize("batch", [1, 32])
def test_batch_size_bounds_accepted(cfg: Config, batch: int) -> None:
    """batch_size 1 and 32 are accepted with visual frames of the matching size."""
    valid = validate(_request(batch_size=batch, visual_frames=_visual(batch)), cfg)
    assert valid.visual.shape == (batch, 6, 320, 320)


def test_visual_size_mismatch(cfg: Config) -> None:
    """Visual frames of another batch size give the original's size message in bytes."""
    req = _request(batch_size=2, visual_frames=_visual(1))
    assert _error(req, cfg) == "Invalid visual frames size: got 2457600 bytes, expected 4915200 bytes"


@pytest.mark.parametrize("fields, message", [
    ({"raw_audio": b"\x00" * 6},
     "Invalid raw audio size: got 6 bytes, expected a multiple of 4 (float32 samples)"),
    ({"sample_rate": 7999}, "sample_rate must be 8000-192000 Hz, got 7999"),
    ({"sample_rate": 192001}, "sample_rate must be 8000-192000 Hz, got 192001"),
    ({"sample_rate": -16000}, "sample_rate must be 8000-192000 Hz, got -16000"),
    ({"sample_rate": 8000, "raw_audio": _audio(8000 * 60 + 1)},
     "raw_audio too long: 60.0 s, at most 60 s per request"),
    ({"sample_rate": 0, "raw_audio": _audio(16000 * 61)},
     "raw_audio too long: 61.0 s, at most 60 s per request"),
    ({"raw_audio": b"", "audio_features": b"\x00" * 100},
     "Invalid audio features size: got 100 bytes, expected 32768 bytes"),
    ({"raw_audio": b""}, "Either raw_audio or audio_features must be provided"),
])
def test_audio_messages(cfg: Config, fields: dict[str, object], message: str) -> None:
    """Each audio fault gives its exact message."""
    assert _error(_request(**fields), cfg) == message


def test_sample_rate_zero_means_16k(cfg: Config) -> None:
    """sample_rate 0 (unset) is taken as 16000 Hz; a set rate is kept."""
    assert validate(_request(sample_rate=0), cfg).sample_rate == 16000
    assert validate(_request(sample_rate=44100), cfg).sample_rate == 44100
    # 60 s at the default rate is the longest accepted
    assert validate(_request(raw_audio=_audio(16000 * 60)), cfg).audio.size == 16000 * 60


def test_valid_request_views(cfg: Config) -> None:
    """A valid request carries read-only float32 views of the request's bytes, shaped."""
    audio = np.linspace(-1, 1, 10240, dtype="<f4")
    visual = np.random.default_rng(0).random(2 * FRAME_FLOATS, dtype=np.float32)
    valid = validate(_request(batch_size=2, visual_frames=visual.tobytes(),
                              raw_audio=audio.tobytes(), start_frame_idx=7), cfg)
    assert isinstance(valid, InferInput)
    assert valid.visual.shape == (2, 6, 320, 320) and valid.visual.dtype == np.float32
    np.testing.assert_array_equal(valid.visual.reshape(-1), visual)
    np.testing.assert_array_equal(valid.audio, audio)
    assert not valid.visual.flags.writeable
    assert valid.features is None and valid.start_frame_idx == 7


def test_raw_audio_wins_over_features(cfg: Config) -> None:
    """With both raw_audio and audio_features, raw_audio is used and the features are not checked."""
    valid = validate(_request(audio_features=b"\x00" * 3), cfg)
    assert valid.audio is not None and valid.features is None


def test_features_path(cfg: Config) -> None:
    """32768 bytes of audio_features alone are accepted as 8192 float32."""
    features = np.arange(FEATURE_FLOATS, dtype="<f4")
    valid = validate(_request(raw_audio=b"", audio_features=features.tobytes()), cfg)
    assert valid.audio is None
    np.testing.assert_array_equal(valid.features, features)


# --- NaN / Inf ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_audio_rejected(cfg: Config, bad: float) -> None:
    """One NaN or Inf sample in raw_audio or audio_features is rejected."""
    audio = np.zeros(10240, "<f4")
    audio[5000] = bad
    assert _error(_request(raw_audio=audio.tobytes()), cfg) == "raw_audio contains NaN or Inf values"
    features = np.zeros(FEATURE_FLOATS, "<f4")
    features[-1] = bad
    assert _error(_request(raw_audio=b"", audio_features=features.tobytes()), cfg) == (
        "audio_features contains NaN or Inf values")


def test_opposite_infinities_rejected(cfg: Config) -> None:
    """+Inf and -Inf together (their sum is NaN, not Inf) are still rejected."""
    audio = np.zeros(10240, "<f4")
    audio[[1, 2]] = [np.inf, -np.inf]
    assert _error(_request(raw_audio=audio.tobytes()), cfg) == "raw_audio contains NaN or Inf values"


def test_huge_finite_values_accepted(cfg: Config) -> None:
    """Values of 3e38, whose float32 sum overflows to Inf, are finite and accepted everywhere."""
    huge = np.full(10240, 3e38, "<f4")
    with np.errstate(over="ignore"):
        assert np.isinf(huge.sum(dtype=np.float32))  # the input really overflows a float32 sum
    valid = validate(_request(raw_audio=huge.tobytes()), cfg)
    assert valid.audio is not None and valid.audio.max() == np.float32(3e38)
    features = np.full(FEATURE_FLOATS, -3e38, "<f4")
    assert validate(_request(raw_audio=b"", audio_features=features.tobytes()), cfg).features is not None
    visual = np.full((1, 6, 320, 320), 3e38, "<f4")
    copy = np.empty_like(visual)
    copy_finite_visual(visual, copy)
    assert np.array_equal(copy, visual)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_visual_finiteness(cfg: Config, bad: float) -> None:
    """validate() leaves the visual check to the copy into shared memory, which rejects
    NaN/Inf wherever it sits (first, middle or last float, every chunk boundary)."""
    for position in (0, FRAME_FLOATS // 2, (1 << 18) - 1, 1 << 18, FRAME_FLOATS - 1):
        visual = np.full(FRAME_FLOATS, 0.5, "<f4")
        visual[position] = bad
        valid = validate(_request(visual_frames=visual.tobytes()), cfg)
        with pytest.raises(InvalidRequest, match=r"^visual_frames contains NaN or Inf values$"):
            copy_finite_visual(valid.visual, np.empty_like(valid.visual))
    good = validate(_request(), cfg).visual
    copy = np.empty_like(good)
    copy_finite_visual(good, copy)
    assert np.array_equal(copy, good)


def test_empty_visual_frames_means_server_built(cfg: Config) -> None:
    """Empty visual_frames is valid: the server builds the visual input (visual is None)."""
    valid = validate(_request(batch_size=3, visual_frames=b""), cfg)
    assert valid.visual is None and valid.batch_size == 3
