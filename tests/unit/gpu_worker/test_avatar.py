"""An avatar's backgrounds decoded into shared memory, its crop rects, and every load error."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import ModelConfig
from pipeline.gpu_worker.avatar import AvatarError, find_frame, load_avatar, load_crop_rects
from pipeline.messages import TensorRef
from pipeline.shm.segment import SharedSegment, list_segments, segment_name
from pipeline.synctalk import mouth_crop

LOADED = 6  # demo frames decoded per test: enough to wrap, small enough to be fast
SMALL_W, SMALL_H = 64, 48




def _model(background_dir: Path, crop_rects_path: Path, num_frames: int) -> ModelConfig:
    return ModelConfig(model_id="m", model_path=background_dir.parent / "unet.onnx",
                       background_dir=background_dir, crop_rects_path=crop_rects_path,
                       num_frames=num_frames)


def _demo_model(models_root: Path, num_frames: int = LOADED) -> ModelConfig:
    demo = models_root / "demo"
    return _model(demo / "frames", demo / "crop_rects.json", num_frames)


def _small_avatar_dir(tmp_path: Path, names: list[str], rects: object = None) -> tuple[Path, Path]:
    """A frames dir with one distinct small image per name, and a crop rects file."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, name in enumerate(names):
        image = np.zeros((SMALL_H, SMALL_W, 3), np.uint8)
        image[:] = (20 * i + 10, 255 - 20 * i, 100)
        image[5:10, 5:10] = 255
        assert cv2.imwrite(str(frames / name), image)
    rects_path = tmp_path / "crop_rects.json"
    # one rect per frame, and a few more than any test loads
    rects_path.write_text(json.dumps(rects if rects is not None else [[8, 8, 40, 40]] * (len(names) + 4)))
    return frames, rects_path


# --- the demo avatar ------------------------------------------------------------------------


def test_load_decodes_frames_into_shared_memory(models_root: Path, instance: str) -> None:
    """load_avatar puts each frame, as cv2.imread decodes it, into a segment other processes
    can map, and keeps each frame's mouth crop as a client cuts it (counted in its bytes)."""
    model = _demo_model(models_root)
    name = segment_name(instance, "bg-demo")
    avatar = load_avatar(model, name)
    reader = SharedSegment.attach(name)
    try:
        assert (avatar.num_frames, avatar.height, avatar.width) == (LOADED, 720, 1280)
        assert avatar.nbytes == LOADED * 720 * 1280 * 3 + LOADED * 3 * 320 * 320
        assert avatar.segment.name == name and avatar.segment.owner
        frames = avatar.frames()
        seen = reader.ndarray(0, (LOADED, 720, 1280, 3), "uint8")
        for i in range(LOADED):
            expected = cv2.imread(str(model.background_dir / f"frame_{i:04d}.jpg"))
            np.testing.assert_array_equal(frames[i], expected)
            np.testing.assert_array_equal(seen[i], expected)
            np.testing.assert_array_equal(avatar.mouths[i], mouth_crop(expected, avatar.rect(i)))
        rects = json.loads(model.crop_rects_path.read_text())
        assert avatar.rects.dtype == np.int32
        np.testing.assert_array_equal(avatar.rects, rects)
        del frames, seen
    finally:
        reader.close()
        avatar.close()
    assert list_segments(instance) == []


def test_background_ref_wraps(models_root: Path, instance: str) -> None:
    """background_ref(i) points at frame i mod num_frames in the segment."""
    avatar = load_avatar(_demo_model(models_root), segment_name(instance, "bg"), threads=1)
    try:
        size = 720 * 1280 * 3
        assert avatar.background_ref(0) == TensorRef(avatar.segment.name, 0, (720, 1280, 3), "uint8")
        assert avatar.background_ref(LOADED + 1) == avatar.background_ref(1)
        ref = avatar.background_ref(3 * LOADED + 4)
        assert ref.offset == 4 * size and ref.nbytes == size
        view = avatar.segment.ndarray(ref.offset, ref.shape, ref.dtype)
        np.testing.assert_array_equal(view, avatar.frames()[4])
        del view
    finally:
        avatar.close()


def test_rect_wraps_with_its_background(models_root: Path, instance: str) -> None:
    """rect(i) is the crop rect of the background frame that background_ref(i) returns."""
    avatar = load_avatar(_demo_model(models_root), segment_name(instance, "bg"), threads=1)
    try:
        rects = json.loads(_demo_model(models_root).crop_rects_path.read_text())
        assert len(rects) > LOADED
        assert avatar.rect(2) == tuple(rects[2])
        assert avatar.rect(3 * LOADED + 2) == avatar.rect(2)
        # output frame LOADED + 1 shows background frame 1: its face is at rect 1, not rect 7
        assert rects[1] != rects[LOADED + 1]
        assert avatar.background_ref(LOADED + 1) == avatar.background_ref(1)
        assert avatar.rect(LOADED + 1) == tuple(rects[1])
    finally:
        avatar.close()


# --- small synthetic avatars ----------------------------------------------------------------


def test_frame_name_variants_in_order(tmp_path: Path, instance: str) -> None:
    """frame_0001.png / frame_1.jpg / .jpeg variants are all found and loaded in index order."""
    names = ["frame_0000.png", "frame_1.jpg", "frame_0002.jpeg", "frame_3.png", "frame_0004.jpg"]
    frames_dir, rects_path = _small_avatar_dir(tmp_path, names)
    avatar = load_avatar(_model(frames_dir, rects_path, len(names)), segment_name(instance, "bg"))
    try:
        frames = avatar.frames()
        for i, name in enumerate(names):
            np.testing.assert_array_equal(frames[i], cv2.imread(str(frames_dir / name)))
        del frames
    finally:
        avatar.close()


def test_find_frame_search_order(tmp_path: Path) -> None:
    """The original's order: extension .png, .jpg, .jpeg first, then zero-padded before plain index."""
    names = {"frame_0001.jpg", "frame_1.png", "frame_0002.png", "frame_2.png", "frame_3.jpeg",
             "frame_0003.jpg", "frame_000010.jpg"}
    assert find_frame(tmp_path, 1, names).name == "frame_1.png"
    assert find_frame(tmp_path, 2, names).name == "frame_0002.png"
    assert find_frame(tmp_path, 3, names).name == "frame_0003.jpg"
    assert find_frame(tmp_path, 1, names).parent == tmp_path
    with pytest.raises(AvatarError, match=r"background frame 10 not found in "):
        find_frame(tmp_path, 10, names)  # frame_%06d is not a name the loader looks for


def test_rect_is_clipped_to_frame(tmp_path: Path, instance: str) -> None:
    """A rect running off the frame is clipped to it and never becomes empty."""
    frames_dir, rects_path = _small_avatar_dir(
        tmp_path, ["frame_0000.png", "frame_0001.png", "frame_0002.png"],
        rects=[[-10, -5, 50, 60], [100, 100, 120, 120], [8, 8, 40, 40]])
    avatar = load_avatar(_model(frames_dir, rects_path, 3), segment_name(instance, "bg"))
    try:
        assert avatar.rect(0) == (0, 0, 50, SMALL_H)
        assert avatar.rect(1) == (SMALL_W - 1, SMALL_H - 1, SMALL_W, SMALL_H)
        assert avatar.rect(2) == (8, 8, 40, 40)
    finally:
        avatar.close()


# --- crop rect errors -----------------------------------------------------------------------


def test_crop_rects_missing_file(tmp_path: Path) -> None:
    """A missing crop rects file is an AvatarError naming the file."""
    path = tmp_path / "nope.json"
    with pytest.raises(AvatarError) as info:
        load_crop_rects(path)
    assert str(info.value) == (f"failed to load crop rects: failed to read crop rects file: "
                               f"{path}: No such file or directory")


def test_crop_rects_bad_json(tmp_path: Path) -> None:
    """Crop rects that are not JSON give an AvatarError naming the file."""
    path = tmp_path / "rects.json"
    path.write_text("[[1, 2, 3, 4],")
    with pytest.raises(AvatarError, match=r"^failed to load crop rects: failed to parse crop rects "
                                          r"JSON: .*rects\.json"):
        load_crop_rects(path)


@pytest.mark.parametrize("data", [
    {}, [], [1, 2, 3, 4], [[1, 2, 3]], [[1, 2, 3, 4, 5]], [[1, 2, 3, "4"]], [[1.0, 2, 3, 4]],
    [[1, 2, 3, 4], None],
])
def test_crop_rects_wrong_shape(tmp_path: Path, data: object) -> None:
    """Anything but a non-empty list of 4-int lists is an AvatarError naming the file."""
    path = tmp_path / "rects.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AvatarError) as info:
        load_crop_rects(path)
    assert str(info.value) == (f"failed to load crop rects: {path}: expected a non-empty JSON "
                               "list of [x1, y1, x2, y2] integer lists")


@pytest.mark.parametrize("rect", [[10, 10, 10, 20], [10, 10, 20, 10], [20, 10, 10, 30]])
def test_crop_rects_empty_rect(tmp_path: Path, rect: list[int]) -> None:
    """A rect with x2 <= x1 or y2 <= y1 is an AvatarError naming the file and the rect."""
    path = tmp_path / "rects.json"
    path.write_text(json.dumps([[0, 0, 10, 10], rect]))
    with pytest.raises(AvatarError) as info:
        load_crop_rects(path)
    assert str(info.value) == (f"failed to load crop rects: {path}: rect 1 {rect} is empty "
                               "(need x2 > x1 and y2 > y1)")


# --- background errors: a clear message and nothing left in /dev/shm -----------------------


def test_missing_frame(tmp_path: Path, instance: str) -> None:
    """A frame index with no file gives 'background frame N not found in DIR'."""
    frames_dir, rects_path = _small_avatar_dir(tmp_path, ["frame_0000.png", "frame_0001.png"])
    with pytest.raises(AvatarError) as info:
        load_avatar(_model(frames_dir, rects_path, 3), segment_name(instance, "bg"))
    assert str(info.value) == (f"failed to load backgrounds: background frame 2 not found in "
                               f"{frames_dir}")
    assert list_segments(instance) == []


def test_missing_background_dir(tmp_path: Path, instance: str) -> None:
    """A background directory that does not exist is an AvatarError naming it."""
    _, rects_path = _small_avatar_dir(tmp_path, [], rects=[[0, 0, 8, 8]])
    missing = tmp_path / "absent"
    with pytest.raises(AvatarError) as info:
        load_avatar(_model(missing, rects_path, 1), segment_name(instance, "bg"))
    assert str(info.value) == (f"failed to load backgrounds: background directory '{missing}': "
                               "No such file or directory")
    assert list_segments(instance) == []


def test_frame_of_different_size(tmp_path: Path, instance: str) -> None:
    """A frame whose size differs from frame 0 is an error naming it; no segment is left behind."""
    names = [f"frame_{i:04d}.png" for i in range(4)]
    frames_dir, rects_path = _small_avatar_dir(tmp_path, names)
    odd = frames_dir / names[2]
    cv2.imwrite(str(odd), np.zeros((24, 32, 3), np.uint8))
    with pytest.raises(AvatarError) as info:
        load_avatar(_model(frames_dir, rects_path, 4), segment_name(instance, "bg"))
    assert str(info.value) == (f"failed to load backgrounds: {odd} is 32x24, frame 0 is "
                               f"{SMALL_W}x{SMALL_H}")
    assert list_segments(instance) == []


@pytest.mark.parametrize("bad_index", [0, 3])
def test_corrupt_frame(tmp_path: Path, instance: str, bad_index: int) -> None:
    """A file that does not decode is an error naming it; no segment is left behind."""
    names = [f"frame_{i:04d}.jpg" for i in range(5)]
    frames_dir, rects_path = _small_avatar_dir(tmp_path, names)
    corrupt = frames_dir / names[bad_index]
    corrupt.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(AvatarError) as info:
        load_avatar(_model(frames_dir, rects_path, 5), segment_name(instance, "bg"))
    assert str(info.value) == f"failed to load backgrounds: cannot decode {corrupt}"
    assert list_segments(instance) == []


def test_too_few_rects_for_the_frames(tmp_path: Path, instance: str) -> None:
    """A crop rects file with fewer rects than num_frames is a load error naming the file."""
    frames_dir, rects_path = _small_avatar_dir(tmp_path, ["frame_0000.png", "frame_0001.png"],
                                               rects=[[8, 8, 40, 40]])
    with pytest.raises(AvatarError) as info:
        load_avatar(_model(frames_dir, rects_path, 2), segment_name(instance, "bg"))
    assert str(info.value) == (f"failed to load crop rects: {rects_path} has 1 rects for "
                               "num_frames 2 (one per frame needed)")
    assert list_segments(instance) == []


def test_server_built_visual_input_equals_the_clients(models_root: Path, instance: str) -> None:
    """Avatar.visual_inputs gives exactly the tensor a SyncTalk client sends (across the wrap)."""
    from pipeline.client import build_request
    from tests.conftest import write_config

    config = write_config(models_root.parent / f"{instance}.yaml", models_root)
    client = np.frombuffer(build_request(config, "demo", 4, 248).visual_frames,
                           np.float32).reshape(4, 6, 320, 320)
    model = _demo_model(models_root, num_frames=250)
    avatar = load_avatar(model, segment_name(instance, "bg"), threads=2)
    try:
        server = avatar.visual_inputs(range(248, 252), out=np.empty((4, 6, 320, 320), np.float32))
    finally:
        avatar.close()
    np.testing.assert_array_equal(server, client)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"])
def test_every_common_image_format_loads(tmp_path: Path, instance: str, ext: str) -> None:
    """Backgrounds in each common format load into the segment exactly as OpenCV decodes them."""
    names = [f"frame_{i:04d}{ext}" for i in range(3)]
    frames_dir, rects_path = _small_avatar_dir(tmp_path, names)
    avatar = load_avatar(_model(frames_dir, rects_path, 3), segment_name(instance, "bg"))
    try:
        for i, name in enumerate(names):
            expected = cv2.imread(str(frames_dir / name))
            np.testing.assert_array_equal(avatar.frames()[i], expected)
    finally:
        avatar.close()
