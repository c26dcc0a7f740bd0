"""`lipsync prepare-avatar`: frames and rects laid out for the loader, a config block that
validates, and a clear one-line error for every bad input."""
from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from pipeline.cli.prepare_avatar import PrepareError, prepare_avatar, register
from pipeline.config import parse_config
from pipeline.gpu_worker.avatar import load_avatar
from pipeline.shm.segment import segment_name

W, H = 64, 48
FRAMES = 12
RECT = [8, 4, 40, 36]
ROOT = Path(__file__).resolve().parents[2]


def _colour(i: int) -> tuple[int, int, int]:
    """A distinct flat BGR colour per frame index, far apart so JPEG cannot confuse them."""
    return (20 * i, 240 - 20 * i, 60 + 15 * i)


def _make_video(path: Path, frames: int = FRAMES) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (W, H))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((H, W, 3), _colour(i), np.uint8))
    writer.release()
    return path


def _make_rects(path: Path, count: int = FRAMES, rects: list[list[int]] | None = None) -> Path:
    path.write_text(json.dumps(rects if rects is not None else [RECT] * count))
    return path


@pytest.fixture
def video(tmp_path: Path) -> Path:
    return _make_video(tmp_path / "in.avi")


@pytest.fixture
def rects(tmp_path: Path) -> Path:
    return _make_rects(tmp_path / "rects.json")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lipsync")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prepare-avatar", *argv])
    return args.func(args)


# --- success ----------------------------------------------------------------------------------


def test_frames_written_in_order_with_loader_names(tmp_path: Path, video: Path,
                                                    rects: Path) -> None:
    """Every frame lands as frame_%04d.jpg, in video order, with its own colour."""
    out = tmp_path / "avatar"
    prepare_avatar(video, rects, out, progress=False)
    names = sorted(os.listdir(out / "frames"))
    assert names == [f"frame_{i:04d}.jpg" for i in range(FRAMES)]
    for i in range(FRAMES):
        frame = cv2.imread(str(out / "frames" / f"frame_{i:04d}.jpg"))
        assert frame.shape == (H, W, 3)
        mean = frame.reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(mean, _colour(i), atol=6, err_msg=f"frame {i}")
    # the staging directory is gone
    assert sorted(os.listdir(out)) == ["crop_rects.json", "frames"]


def test_crop_rects_copied(tmp_path: Path, video: Path, rects: Path) -> None:
    """The rects file is copied byte for byte to OUT/crop_rects.json."""
    out = tmp_path / "avatar"
    prepare_avatar(video, rects, out, progress=False)
    assert (out / "crop_rects.json").read_bytes() == rects.read_bytes()


def test_jpeg_quality_is_honoured(tmp_path: Path, video: Path, rects: Path) -> None:
    """A lower --jpeg-quality writes smaller files than the default 95."""
    noisy = tmp_path / "noisy.avi"
    writer = cv2.VideoWriter(str(noisy), cv2.VideoWriter_fourcc(*"MJPG"), 25, (W, H))
    writer.write(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
    writer.release()
    prepare_avatar(noisy, rects, tmp_path / "hi", progress=False)
    prepare_avatar(noisy, rects, tmp_path / "lo", jpeg_quality=20, progress=False)
    hi = (tmp_path / "hi" / "frames" / "frame_0000.jpg").stat().st_size
    lo = (tmp_path / "lo" / "frames" / "frame_0000.jpg").stat().st_size
    assert lo < hi * 0.7


def test_files_are_readable_by_another_user(tmp_path: Path, video: Path, rects: Path) -> None:
    """The frames, their folder and the rects get the umask's modes (0755/0644 under 022),
    not tempfile's private 0700/0600: a server running as another user can read them."""
    out = tmp_path / "avatar"
    old = os.umask(0o022)
    try:
        prepare_avatar(video, rects, out, progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "frames").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "crop_rects.json").stat().st_mode) == 0o644
    assert {stat.S_IMODE(p.stat().st_mode) for p in (out / "frames").iterdir()} == {0o644}


def test_config_block_validates_and_avatar_loads(tmp_path: Path, video: Path, rects: Path,
                                                 instance: str) -> None:
    """The printed block, nested under models:, passes parse_config and load_avatar loads it."""
    out = tmp_path / "avatar"
    block = prepare_avatar(video, rects, out, model_id="alice", progress=False)
    models_root = tmp_path / "models_root"
    models_root.mkdir()
    cfg = parse_config(yaml.safe_load("models:\n" + block), base_dir=tmp_path)
    model = cfg.models["alice"]
    assert model.model_path == (tmp_path / "models" / "alice" / "unet.onnx").resolve()
    cfg = parse_config(yaml.safe_load(f"models_root: {models_root}\nmodels:\n" + block),
                       base_dir=tmp_path)
    model = cfg.models["alice"]
    assert model.model_path == models_root / "alice" / "unet.onnx"
    assert model.background_dir == out / "frames"
    assert model.crop_rects_path == out / "crop_rects.json"
    assert model.source_video == video
    assert model.num_frames == FRAMES
    assert (model.preload_model, model.preload_backgrounds) == (False, False)
    assert (model.preferred_gpu, model.composite_mode) == (-1, "synctalk")
    avatar = load_avatar(model, segment_name(instance, "bg-prep"), threads=2)
    try:
        assert (avatar.num_frames, avatar.height, avatar.width) == (FRAMES, H, W)
        np.testing.assert_array_equal(avatar.rects, [RECT] * FRAMES)
        frames = avatar.frames()
        np.testing.assert_allclose(frames[FRAMES - 1].reshape(-1, 3).mean(axis=0),
                                   _colour(FRAMES - 1), atol=6)
        del frames
    finally:
        avatar.close()


def test_model_id_defaults_to_out_name(tmp_path: Path, video: Path, rects: Path) -> None:
    """Without --model-id the block's key is OUT's directory name; odd ids are quoted."""
    block = prepare_avatar(video, rects, tmp_path / "bob", progress=False)
    assert list(yaml.safe_load(block)) == ["bob"]
    block = prepare_avatar(video, rects, tmp_path / "x", model_id="123", progress=False)
    cfg = parse_config(yaml.safe_load("models:\n" + block), base_dir=tmp_path)
    assert list(cfg.models) == ["123"]


def test_paths_with_yaml_specials_round_trip(tmp_path: Path, video: Path, rects: Path) -> None:
    """An output path holding ': ' and ' #' still reads back exactly from the block."""
    out = tmp_path / "odd: dir #1"
    block = prepare_avatar(video, rects, out, model_id="m", progress=False)
    cfg = parse_config(yaml.safe_load("models:\n" + block), base_dir=tmp_path)
    assert cfg.models["m"].background_dir == out / "frames"


def test_num_frames_extracts_prefix(tmp_path: Path, video: Path) -> None:
    """--num-frames N writes only frames 0..N-1 and needs only N rects."""
    few = _make_rects(tmp_path / "few.json", 5)
    out = tmp_path / "avatar"
    block = prepare_avatar(video, few, out, num_frames=5, progress=False)
    assert sorted(os.listdir(out / "frames")) == [f"frame_{i:04d}.jpg" for i in range(5)]
    assert yaml.safe_load(block)["avatar"]["num_frames"] == 5
    last = cv2.imread(str(out / "frames" / "frame_0004.jpg"))
    np.testing.assert_allclose(last.reshape(-1, 3).mean(axis=0), _colour(4), atol=6)


def test_more_rects_than_frames_warns(tmp_path: Path, video: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Extra rects are allowed with a warning; num_frames is the frame count."""
    many = _make_rects(tmp_path / "many.json", FRAMES + 3)
    block = prepare_avatar(video, many, tmp_path / "avatar", progress=False)
    assert yaml.safe_load(block)["avatar"]["num_frames"] == FRAMES
    err = capsys.readouterr().err
    assert "warning" in err and f"{FRAMES + 3} rects for {FRAMES} frames" in err


# --- errors ------------------------------------------------------------------------------------


def test_missing_video(tmp_path: Path, rects: Path) -> None:
    """A video that does not exist is named in the error, and nothing is created."""
    with pytest.raises(PrepareError, match=r"video not found: .*nope\.mp4"):
        prepare_avatar(tmp_path / "nope.mp4", rects, tmp_path / "avatar", progress=False)
    assert not (tmp_path / "avatar").exists()


def test_text_file_named_mp4(tmp_path: Path, rects: Path) -> None:
    """A file OpenCV cannot read is named in the error, and the output dir is not left behind."""
    fake = tmp_path / "fake.mp4"
    fake.write_text("not a video\n")
    with pytest.raises(PrepareError, match=r"fake\.mp4"):
        prepare_avatar(fake, rects, tmp_path / "avatar", progress=False)
    assert not (tmp_path / "avatar").exists()


def test_bad_rects_file(tmp_path: Path, video: Path) -> None:
    """An unparsable rects file fails with the loader's message naming it."""
    bad = tmp_path / "bad.json"
    bad.write_text("[[1, 2, 3]")
    with pytest.raises(PrepareError, match=r"failed to parse crop rects JSON: .*bad\.json"):
        prepare_avatar(video, bad, tmp_path / "avatar", progress=False)


@pytest.mark.parametrize("rect", [[-1, 0, 10, 10], [0, -2, 10, 10], [50, 0, W + 1, 10],
                                  [0, 10, 10, H + 1]])
def test_rect_outside_frame(tmp_path: Path, video: Path, rect: list[int]) -> None:
    """A rect past any frame edge is reported by index and value; no frames are installed."""
    path = _make_rects(tmp_path / "r.json", rects=[RECT] * 3 + [rect] + [RECT] * FRAMES)
    with pytest.raises(PrepareError, match=rf"rect 3 \[{rect[0]}, {rect[1]}, {rect[2]}, "
                                           rf"{rect[3]}\] lies outside the {W}x{H} frame"):
        prepare_avatar(video, path, tmp_path / "avatar", progress=False)
    assert not (tmp_path / "avatar").exists()


def test_rect_on_frame_edge_is_inside(tmp_path: Path, video: Path) -> None:
    """Rects are half-open: x2 == W and y2 == H still lie inside."""
    path = _make_rects(tmp_path / "r.json", rects=[[0, 0, W, H]] * FRAMES)
    prepare_avatar(video, path, tmp_path / "avatar", progress=False)
    assert len(os.listdir(tmp_path / "avatar" / "frames")) == FRAMES


def test_fewer_rects_than_frames(tmp_path: Path, video: Path) -> None:
    """Fewer rects than frames fails, saying both counts, and installs nothing."""
    few = _make_rects(tmp_path / "few.json", FRAMES - 2)
    out = tmp_path / "avatar"
    out.mkdir()
    with pytest.raises(PrepareError, match=rf"has {FRAMES - 2} rects but .* has {FRAMES} frames"):
        prepare_avatar(video, few, out, progress=False)
    assert os.listdir(out) == []  # no staging dir, no frames, no rects


def test_existing_frames_refused_without_force(tmp_path: Path, video: Path, rects: Path) -> None:
    """Frames already in OUT/frames are refused, and left untouched."""
    out = tmp_path / "avatar"
    (out / "frames").mkdir(parents=True)
    (out / "frames" / "frame_0000.jpg").write_bytes(b"old")
    with pytest.raises(PrepareError, match=r"already holds 1 files; use --force"):
        prepare_avatar(video, rects, out, progress=False)
    assert os.listdir(out / "frames") == ["frame_0000.jpg"]
    assert (out / "frames" / "frame_0000.jpg").read_bytes() == b"old"


def test_existing_frames_replaced_with_force(tmp_path: Path, video: Path, rects: Path) -> None:
    """--force replaces OUT/frames wholly: stale files beyond the new count disappear."""
    out = tmp_path / "avatar"
    (out / "frames").mkdir(parents=True)
    (out / "frames" / "frame_0000.jpg").write_bytes(b"old")
    (out / "frames" / "frame_0099.jpg").write_bytes(b"stale")
    prepare_avatar(video, rects, out, force=True, progress=False)
    assert sorted(os.listdir(out / "frames")) == [f"frame_{i:04d}.jpg" for i in range(FRAMES)]
    assert cv2.imread(str(out / "frames" / "frame_0000.jpg")) is not None
    assert sorted(os.listdir(out)) == ["crop_rects.json", "frames"]


def test_empty_frames_dir_is_reused(tmp_path: Path, video: Path, rects: Path) -> None:
    """An existing but empty OUT/frames needs no --force."""
    out = tmp_path / "avatar"
    (out / "frames").mkdir(parents=True)
    prepare_avatar(video, rects, out, progress=False)
    assert len(os.listdir(out / "frames")) == FRAMES


def test_num_frames_beyond_video(tmp_path: Path, video: Path) -> None:
    """--num-frames larger than the video fails, saying how many frames it has."""
    many = _make_rects(tmp_path / "many.json", 40)
    with pytest.raises(PrepareError, match=rf"--num-frames 20: .* has only {FRAMES} frames"):
        prepare_avatar(video, many, tmp_path / "avatar", num_frames=20, progress=False)
    assert not (tmp_path / "avatar").exists()


def test_zero_frame_video(tmp_path: Path, rects: Path) -> None:
    """A video container with no frames is a clear error naming it."""
    empty = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 25, (W, H))
    writer.release()
    with pytest.raises(PrepareError, match=r"empty\.avi"):
        prepare_avatar(empty, rects, tmp_path / "avatar", progress=False)
    assert not (tmp_path / "avatar").exists()


def test_frame_write_failure(tmp_path: Path, video: Path, rects: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame that fails to write is named; the existing frames/ is left as it was."""
    out = tmp_path / "avatar"
    (out / "frames").mkdir(parents=True)
    (out / "frames" / "keep.jpg").write_bytes(b"old")
    calls = iter(range(100))
    real = cv2.imwrite
    monkeypatch.setattr(cv2, "imwrite",
                        lambda path, img, params=None: next(calls) < 3 and real(path, img, params))
    with pytest.raises(PrepareError, match=r"cannot write frame 3 to .*frame_0003\.jpg"):
        prepare_avatar(video, rects, out, force=True, progress=False)
    assert sorted(os.listdir(out)) == ["frames"]
    assert os.listdir(out / "frames") == ["keep.jpg"]


@pytest.mark.parametrize("kwargs, message", [
    ({"jpeg_quality": 101}, "--jpeg-quality must be 0-100"),
    ({"num_frames": 0}, "--num-frames must be >= 1"),
])
def test_bad_options(tmp_path: Path, video: Path, rects: Path, kwargs: dict[str, int],
                     message: str) -> None:
    """Out-of-range --jpeg-quality and --num-frames are refused before any work."""
    with pytest.raises(PrepareError, match=message):
        prepare_avatar(video, rects, tmp_path / "avatar", progress=False, **kwargs)


# --- the command -------------------------------------------------------------------------------


def test_cli_prints_block(tmp_path: Path, video: Path, rects: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """The command exits 0 and prints a YAML block that validates under models:."""
    out = tmp_path / "avatar"
    code = _cli(["--video", str(video), "--crop-rects", str(rects), "--out", str(out),
                 "--model-id", "carol"])
    assert code == 0
    printed = capsys.readouterr().out
    cfg = parse_config(yaml.safe_load("models:\n" + printed), base_dir=tmp_path)
    assert cfg.models["carol"].num_frames == FRAMES


def test_cli_error_is_one_line(tmp_path: Path, video: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """A command error exits 2 with one `lipsync prepare-avatar: ...` line and no traceback."""
    few = _make_rects(tmp_path / "few.json", 3)
    code = _cli(["--video", str(video), "--crop-rects", str(few), "--out", str(tmp_path / "a")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lipsync prepare-avatar: ") and "has 3 rects but" in lines[0]
    assert "Traceback" not in captured.err


def test_cli_unreadable_video_in_subprocess(tmp_path: Path, rects: Path) -> None:
    """In a fresh process, a text file named .mp4 gives exit 2 and exactly one stderr line."""
    fake = tmp_path / "fake.mp4"
    fake.write_text("hello\n")
    code = ("import argparse, sys; from pipeline.cli.prepare_avatar import register; "
            "p = argparse.ArgumentParser(prog='lipsync'); register(p.add_subparsers()); "
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_LOGLEVEL"}
    proc = subprocess.run([sys.executable, "-c", code, "prepare-avatar", "--video", str(fake),
                           "--crop-rects", str(rects), "--out", str(tmp_path / "a")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"lipsync prepare-avatar: cannot open video {fake}: "
                                        "not a format OpenCV can read"]


@pytest.mark.parametrize(("umask", "dirs", "files"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)],
                         ids=["umask-022", "umask-027"])
def test_output_is_readable_as_the_umask_allows(tmp_path: Path, video: Path, rects: Path,
                                                umask: int, dirs: int, files: int) -> None:
    """frames/, its JPEGs and crop_rects.json get the modes the umask gives (root prepares,
    the service user serves), not a temporary file's 0700 / 0600."""
    out = tmp_path / "avatar"
    old = os.umask(umask)
    try:
        prepare_avatar(video, rects, out, progress=False)
        prepare_avatar(video, rects, out, progress=False, force=True)  # the replacing path too
    finally:
        os.umask(old)
    assert (out / "frames").stat().st_mode & 0o777 == dirs
    assert (out / "crop_rects.json").stat().st_mode & 0o777 == files
    assert {p.stat().st_mode & 0o777 for p in (out / "frames").iterdir()} == {files}
