"""Tests of the built-in demo avatar and its two ONNX graphs (CPU only)."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import cv2
import librosa
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.signal

from pipeline.config import parse_config
from pipeline.demo import assets, graphs
from pipeline.demo.assets import (
    NUM_FRAMES,
    build_demo_assets,
    demo_asset_paths,
    demo_assets_present,
)
from pipeline.demo.ensure import ensure_demo_assets
from pipeline.demo.frames import FRAME_H, FRAME_W, demo_crop_rect, draw_background_frame
from pipeline.demo.graphs import build_audio_encoder_model, build_unet_model
from tests.conftest import reference_file

SMALL = 12  # frames per test build: enough to cover the motion, fast to write
CPU = ["CPUExecutionProvider"]


# --- helpers ------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _reference_mel(x: np.ndarray) -> np.ndarray:
    """The SyncTalk-2D reference mel, time-major [T, 80] in [-4, 4]."""
    x = scipy.signal.lfilter([1, -0.97], [1], x)
    s = np.abs(librosa.stft(x, n_fft=800, hop_length=200, win_length=800))
    m = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ s
    s = 20 * np.log10(np.maximum(1e-5, m)) - 20
    return np.clip(8 * (s + 100) / 100 - 4, -4, 4).T


def _mel_windows(mel: np.ndarray) -> np.ndarray:
    n = int((len(mel) - 16) / 80 * 25) + 2
    starts = [min(int(80 * j / 25), len(mel) - 16) for j in range(n)]
    return np.stack([mel[s : s + 16].T for s in starts])[:, None].astype(np.float32)


def _frame_audio(feats: np.ndarray) -> np.ndarray:
    """Per-frame [32,16,16] UNet audio tensors: rows P[i-8 .. i+7], zeros out of range."""
    padded = np.concatenate([feats[:1], feats, feats[-1:]])
    zero = np.zeros(feats.shape[1], np.float32)
    frames = []
    for i in range(len(feats)):
        rows = [padded[k] if 0 <= k < len(padded) else zero for k in range(i - 8, i + 8)]
        frames.append(np.stack(rows).reshape(32, 16, 16))
    return np.stack(frames).astype(np.float32)


def _unet_input(frame: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """The SyncTalk 6-channel input [1,6,320,320] built from a frame and its crop rect."""
    x1, y1, x2, y2 = rect
    crop = cv2.resize(frame[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    ref = crop[4:324, 4:324].copy()
    masked = ref.copy()
    cv2.rectangle(masked, (5, 5), (310, 305), (0, 0, 0), -1)
    six = np.concatenate([ref, masked], axis=2).transpose(2, 0, 1)
    return (six[None].astype(np.float32) / 255.0).copy()


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _features(level: float, batch: int = 1) -> np.ndarray:
    return np.full((batch, 32, 16, 16), level, np.float32)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[assets.DemoAssets, list]:
    calls: list[tuple[int, int]] = []
    root = tmp_path_factory.mktemp("models")
    paths = build_demo_assets(root, num_frames=SMALL, progress=lambda d, t: calls.append((d, t)))
    return paths, calls


@pytest.fixture(scope="module")
def unet() -> ort.InferenceSession:
    return ort.InferenceSession(build_unet_model().SerializeToString(), providers=CPU)


@pytest.fixture(scope="module")
def encoder() -> ort.InferenceSession:
    return ort.InferenceSession(build_audio_encoder_model().SerializeToString(), providers=CPU)


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """The UNet input of demo frame 7, as a server would build it."""
    return _unet_input(draw_background_frame(7), demo_crop_rect(7))


@pytest.fixture(scope="module")
def speech_windows() -> np.ndarray:
    return _mel_windows(_reference_mel(np.load(reference_file("speech_16k.npy")).astype(np.float64)))


# --- files --------------------------------------------------------------------------------


def test_paths_follow_the_models_root_layout(tmp_path: Path) -> None:
    """demo_asset_paths names the documented layout and creates nothing."""
    p = demo_asset_paths(tmp_path)
    assert p.root == tmp_path
    assert p.unet_path == tmp_path / "demo" / "unet.onnx"
    assert p.background_dir == tmp_path / "demo" / "frames"
    assert p.crop_rects_path == tmp_path / "demo" / "crop_rects.json"
    assert p.audio_encoder_path == tmp_path / "audio_encoder.onnx"
    assert list(tmp_path.iterdir()) == []


def test_build_writes_frames_rects_and_graphs(built) -> None:
    """A build writes num_frames 1280×720 JPEGs, one square in-frame rect each, both graphs."""
    paths, _ = built
    frames = sorted(paths.background_dir.iterdir())
    assert [f.name for f in frames] == [f"frame_{i:04d}.jpg" for i in range(SMALL)]
    for f in frames:
        img = cv2.imread(str(f))
        assert img is not None and img.shape == (FRAME_H, FRAME_W, 3)
    rects = json.loads(paths.crop_rects_path.read_text())
    assert len(rects) == SMALL
    assert rects == [list(demo_crop_rect(i)) for i in range(SMALL)]
    onnx.checker.check_model(onnx.load(str(paths.unet_path)))
    onnx.checker.check_model(onnx.load(str(paths.audio_encoder_path)))
    assert demo_assets_present(paths.root, SMALL)
    assert not list(paths.root.glob(".demo-build-*"))


def test_progress_reports_every_frame_in_order(built) -> None:
    """The progress callback sees (1, n) … (n, n), once per frame."""
    _, calls = built
    assert calls == [(i, SMALL) for i in range(1, SMALL + 1)]


def test_jpeg_frames_are_the_drawn_frames(built) -> None:
    """Each stored frame decodes to draw_background_frame(index) up to JPEG loss."""
    paths, _ = built
    for i in (0, 5, SMALL - 1):
        decoded = cv2.imread(str(paths.background_dir / f"frame_{i:04d}.jpg")).astype(np.int16)
        assert np.abs(decoded - draw_background_frame(i)).mean() < 2.0


def test_crop_rects_are_square_inside_and_follow_the_face() -> None:
    """Every loop rect is a square 150–220 px box inside the frame, and the head moves."""
    rects = [demo_crop_rect(i) for i in range(NUM_FRAMES)]
    for x1, y1, x2, y2 in rects:
        assert all(isinstance(v, int) for v in (x1, y1, x2, y2))
        assert x2 - x1 == y2 - y1 and 150 <= x2 - x1 <= 220
        assert 0 <= x1 < x2 <= FRAME_W and 0 <= y1 < y2 <= FRAME_H
    assert len({r[:2] for r in rects}) > 5  # the rect moves with the head
    assert demo_crop_rect(3) == demo_crop_rect(3 + NUM_FRAMES)  # periodic, seamless loop


def test_face_sits_still_inside_its_crop() -> None:
    """The face crop (hence the mouth place) is the same in every frame although the head moves."""
    crops = []
    for i in (0, 12, 30, 41):
        x1, y1, x2, y2 = demo_crop_rect(i)
        crops.append(draw_background_frame(i)[y1:y2, x1:x2].astype(np.int16))
    assert len({demo_crop_rect(i) for i in (0, 12, 30, 41)}) == 4
    for c in crops[1:]:
        # Central face area (skin, nose, mouth) only: the static backdrop shows at the sides.
        assert np.abs(c[:140, 30:162] - crops[0][:140, 30:162]).max() == 0


def test_two_builds_are_byte_identical(built, tmp_path: Path) -> None:
    """Building twice into different dirs gives the same bytes for every file."""
    paths, _ = built
    build_demo_assets(tmp_path, num_frames=SMALL)
    first, second = _files(paths.root), _files(tmp_path)
    assert len(first) == SMALL + 4  # frames, rects, unet, manifest, encoder
    assert first == second
    assert build_unet_model().SerializeToString() == build_unet_model().SerializeToString()


def test_built_frames_differ_pairwise_in_the_counter_corner(built) -> None:
    """Any two stored frames differ clearly where the frame counter is drawn."""
    paths, _ = built
    x1, y1, x2, y2 = assets.COUNTER_BOX
    corners = [
        cv2.imread(str(paths.background_dir / f"frame_{i:04d}.jpg"))[y1:y2, x1:x2].astype(np.int16)
        for i in range(SMALL)
    ]
    for i in range(SMALL):
        for j in range(i + 1, SMALL):
            assert np.abs(corners[i] - corners[j]).mean() > 0.75, (i, j)


def test_every_loop_frame_has_a_distinct_counter() -> None:
    """All 250 drawn frames differ pairwise in the counter box (grey RMS > 5 levels)."""
    x1, y1, x2, y2 = assets.COUNTER_BOX
    grey = [
        cv2.cvtColor(draw_background_frame(i)[y1:y2, x1:x2], cv2.COLOR_BGR2GRAY)
        for i in range(NUM_FRAMES)
    ]
    boxes = np.stack(grey).reshape(NUM_FRAMES, -1).astype(np.float32)
    sq = (boxes**2).sum(axis=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * boxes @ boxes.T) / boxes.shape[1]
    np.fill_diagonal(d2, np.inf)
    assert np.sqrt(np.maximum(d2, 0.0)).min() > 5.0


def test_second_build_is_a_no_op(built) -> None:
    """build_demo_assets leaves a complete build untouched (same mtimes, no progress)."""
    paths, _ = built
    before = {p: p.stat().st_mtime_ns for p in paths.root.rglob("*")}
    calls: list[tuple[int, int]] = []
    build_demo_assets(paths.root, num_frames=SMALL, progress=lambda d, t: calls.append((d, t)))
    assert {p: p.stat().st_mtime_ns for p in paths.root.rglob("*")} == before
    assert calls == []


def test_missing_frame_makes_the_build_incomplete_and_rebuilds(tmp_path: Path) -> None:
    """Deleting one frame makes demo_assets_present False; the next build restores it."""
    paths = build_demo_assets(tmp_path, num_frames=SMALL)
    victim = paths.background_dir / "frame_0005.jpg"
    victim.unlink()
    assert not demo_assets_present(tmp_path, SMALL)
    build_demo_assets(tmp_path, num_frames=SMALL)
    assert victim.is_file() and demo_assets_present(tmp_path, SMALL)


def test_present_requires_the_requested_frame_count(built) -> None:
    """A 12-frame build does not count as the default 250-frame avatar."""
    paths, _ = built
    assert demo_assets_present(paths.root, SMALL)
    assert not demo_assets_present(paths.root)
    assert not demo_assets_present(paths.root / "nowhere")


def test_interrupted_build_is_not_present_and_keeps_the_old_build(tmp_path: Path) -> None:
    """A build that dies midway leaves no staging dir, no new avatar, the old one intact."""

    def die_at_5(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        build_demo_assets(fresh, num_frames=SMALL, progress=die_at_5)
    assert not demo_assets_present(fresh, SMALL)
    assert not (fresh / "demo").exists() and not list(fresh.glob(".demo-build-*"))

    old = tmp_path / "old"
    build_demo_assets(old, num_frames=SMALL)
    before = _files(old)
    with pytest.raises(KeyboardInterrupt):
        build_demo_assets(old, num_frames=SMALL, force=True, progress=die_at_5)
    assert demo_assets_present(old, SMALL) and _files(old) == before


def test_dead_builders_staging_dirs_are_swept(tmp_path: Path) -> None:
    """A staging dir left by a dead process is removed by the next build."""
    stale = tmp_path / ".demo-build-999999999-abc"
    (stale / "frames").mkdir(parents=True)
    build_demo_assets(tmp_path, num_frames=2)
    assert not stale.exists() and demo_assets_present(tmp_path, 2)


# --- UNet graph ---------------------------------------------------------------------------


def test_unet_graph_contract() -> None:
    """The UNet has the SyncTalk names, dynamic batch, opset 17 and passes the checker."""
    model = build_unet_model()
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    ios = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    dims = {name: _dims(value) for name, value in ios.items()}
    assert dims == {
        "input": ["batch", 6, 320, 320],
        "audio": ["batch", 32, 16, 16],
        "output": ["batch", 3, 320, 320],
    }


@pytest.mark.parametrize("batch", [1, 5])
def test_unet_output_shape_and_range(unet: ort.InferenceSession, batch: int) -> None:
    """For B frames the UNet returns [B,3,320,320] float32 in [0, 1], even for wild inputs."""
    rng = np.random.default_rng(batch)
    x = rng.uniform(-0.5, 1.5, (batch, 6, 320, 320)).astype(np.float32)
    a = rng.uniform(-1.0, 1.0, (batch, 32, 16, 16)).astype(np.float32)
    (out,) = unet.run(None, {"input": x, "audio": a})
    assert out.shape == (batch, 3, 320, 320) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_unet_with_zero_audio_returns_the_reference_face(unet, face) -> None:
    """Zero features keep the mouth closed: the output is the reference, mouth area included."""
    (out,) = unet.run(None, {"input": face, "audio": _features(0.0)})
    np.testing.assert_allclose(out, face[:, :3], atol=1e-6)


def test_unet_with_loud_audio_opens_a_dark_mouth(unet, face) -> None:
    """Strong features draw a dark open mouth at the face's mouth; far pixels stay the reference."""
    (out,) = unet.run(None, {"input": face, "audio": _features(1.0)})
    mx, my0 = graphs.mouth_centre_320()
    cy = round(my0 + 0.35 * graphs.MOUTH_RY_MAX + 5)  # inside the cavity, below the teeth
    cx = round(mx)
    cavity = out[0, :, cy - 3 : cy + 4, cx - 10 : cx + 11].reshape(3, -1)
    assert cavity.max() < 0.35 and cavity[2].mean() > cavity[1].mean()  # dark red/brown
    assert face[0, :3, cy, cx].min() > 0.5  # where the reference has bright skin
    far = np.ones((320, 320), bool)
    far[int(my0) - 60 : int(my0) + 70, int(mx) - 80 : int(mx) + 81] = False
    np.testing.assert_allclose(out[0][:, far], face[0, :3][:, far], atol=1e-6)


def test_unet_mouth_covers_the_drawn_mouth_line(unet, face) -> None:
    """The open mouth is drawn where the avatar's closed mouth line is, and hides it."""
    mx, my0 = graphs.mouth_centre_320()
    win = (slice(int(my0) - 30, int(my0) + 30), slice(int(mx) - 70, int(mx) + 70))
    ref_green = face[0, 1][win]
    line = ref_green < 150 / 255  # the lip line is far less green than skin
    ys, xs = np.nonzero(line)
    assert line.sum() > 50
    assert abs(xs.mean() + win[1].start - mx) < 4 and abs(ys.mean() + win[0].start - my0) < 6
    (out,) = unet.run(None, {"input": face, "audio": _features(0.5 / graphs.UNET_GAIN)})
    changed = np.abs(out[0] - face[0, :3]).max(axis=0)[win]
    assert (changed[line] > 0.1).mean() > 0.95


def test_unet_mouth_opens_monotonically_with_the_features(unet, face) -> None:
    """Louder features give a taller opening; the batch is computed per frame."""
    openness = np.array([0.0, 0.12, 0.3, 0.6, 1.0], np.float32)
    levels = openness / np.float32(graphs.UNET_GAIN)
    audio = np.broadcast_to(levels[:, None, None, None], (5, 32, 16, 16)).copy()
    (out,) = unet.run(None, {"input": np.repeat(face, 5, axis=0), "audio": audio})
    mx = round(graphs.mouth_centre_320()[0])
    heights = [(np.abs(o[:, :, mx] - face[0, :3, :, mx]).max(axis=0) > 0.1).sum() for o in out]
    assert heights[0] == 0
    assert all(a < b for a, b in itertools.pairwise(heights)), heights
    assert heights[-1] >= heights[-2] > 30


# --- audio encoder ------------------------------------------------------------------------


def test_encoder_graph_contract() -> None:
    """The encoder maps mel_spectrogram [B,1,80,16] to audio_features [B,512], dynamic B."""
    model = build_audio_encoder_model()
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "mel_spectrogram" and out.name == "audio_features"
    assert _dims(inp) == ["batch", 1, 80, 16] and _dims(out) == ["batch", 512]


@pytest.mark.parametrize("batch", [1, 3])
def test_encoder_maps_silence_to_zero(encoder: ort.InferenceSession, batch: int) -> None:
    """A silent mel window (-4 everywhere) encodes to exactly zero features."""
    (out,) = encoder.run(None, {"mel_spectrogram": np.full((batch, 1, 80, 16), -4.0, np.float32)})
    assert out.shape == (batch, 512) and out.dtype == np.float32
    assert not out.any()


def test_encoder_follows_speech_energy(encoder, speech_windows) -> None:
    """On real speech the mean feature tracks the window's mel energy (Pearson r > 0.9)."""
    (out,) = encoder.run(None, {"mel_spectrogram": speech_windows})
    energy = ((speech_windows + 4.0) / 8.0).mean(axis=(1, 2, 3))
    assert out.shape == (len(speech_windows), 512) and out.min() >= 0.0
    assert np.corrcoef(energy, out.mean(axis=1))[0, 1] > 0.9


def test_speech_opens_and_closes_the_mouth(encoder, unet, speech_windows) -> None:
    """Over 8 s of speech the encoder + UNet give clearly open mouths and closed ones in pauses."""
    (feats,) = encoder.run(None, {"mel_spectrogram": speech_windows})
    audio = _frame_audio(feats)[:200]
    grey = np.full((1, 6, 320, 320), 0.8, np.float32)
    mx, _my0 = graphs.mouth_centre_320()
    col = round(mx)
    heights = []
    for start in range(0, len(audio), 25):
        batch = audio[start : start + 25]
        (out,) = unet.run(None, {"input": np.repeat(grey, len(batch), axis=0), "audio": batch})
        dark = (out[:, :, :, col] < 0.4).all(axis=1)  # the cavity, not lips or teeth
        heights.extend(dark.sum(axis=1).tolist())
    heights_arr = np.array(heights)
    full = 2 * graphs.MOUTH_RY_MAX
    assert (heights_arr > 0.5 * full).sum() >= 20  # words
    assert (heights_arr == 0).sum() >= 10  # pauses between words


def test_ensure_keeps_a_small_build_that_copies_of_the_avatar_use(built) -> None:
    """A config whose models all show the demo's frames under other names (no `demo` model)
    asks for as many frames as they use: the small build stays, nothing is rebuilt."""
    paths, _ = built
    avatar = {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
              "crop_rects_path": "demo/crop_rects.json", "num_frames": SMALL}
    cfg = parse_config({"models_root": str(paths.root),
                        "models": {"anna": dict(avatar), "ben": dict(avatar)}}, paths.root)
    before = {p: p.stat().st_mtime_ns for p in paths.root.rglob("*")}
    assert ensure_demo_assets(cfg) is False
    assert {p: p.stat().st_mtime_ns for p in paths.root.rglob("*")} == before
