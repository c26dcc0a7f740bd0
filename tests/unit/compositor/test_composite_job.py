"""The compositor's whole work on one CompositeJob, as a pure function over views of
memory: the frames it sends the frontend; no process, no socket."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline import messages as msg
from pipeline.compositor.composite import composite_job, paste
from pipeline.compositor.jpeg_splice import BackgroundJpegs, encode_jpeg

BACKGROUNDS = tuple(msg.TensorRef(f"bg{i}", 0, (120, 160, 3), "uint8") for i in range(3))
RECTS = ((40, 20, 104, 84), (38, 22, 102, 86), (41, 19, 105, 83))
PREDICTIONS = msg.TensorRef("arena", 4096, (3, 3, 320, 320), "float32")


def _job(mode: str = "synctalk", predictions: msg.TensorRef | None = PREDICTIONS) -> msg.CompositeJob:
    return msg.CompositeJob(request_id=5, first_frame=2, predictions=predictions,
                            backgrounds=BACKGROUNDS, rects=RECTS, mode=mode,  # type: ignore[arg-type]
                            jpeg_quality=80)


def _memory() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {**{f"bg{i}": rng.integers(0, 255, (120, 160, 3), np.uint8) for i in range(3)},
            "arena": rng.random((3, 3, 320, 320), np.float32)}


def _kept() -> BackgroundJpegs:
    return BackgroundJpegs(64 * 2**20)


@pytest.mark.parametrize("kept_mb", [0, 64])
def test_a_job_gives_its_frames_done_and_the_jpegs_in_order(kept_mb: int) -> None:
    """[FramesDone, JPEG, JPEG, JPEG]: the header names request, first frame and compositor
    with the summed timings, and each JPEG is its prediction pasted into its background,
    the same bytes whether the backgrounds' rows were kept (twice: encoded, then kept) or
    every frame was encoded whole."""
    memory = _memory()
    jpegs_kept = BackgroundJpegs(kept_mb * 2**20)
    for mode in ("synctalk", "stretch", "synctalk"):
        header, *jpegs = composite_job(_job(mode), lambda ref: memory[ref.segment], 3, jpegs_kept)
        done = msg.frontend_decoder.decode(header)
        assert isinstance(done, msg.FramesDone)
        assert (done.request_id, done.first_frame, done.compositor) == (5, 2, 3)
        assert done.paste_ns > 0 and done.jpeg_ns > 0
        assert len(jpegs) == 3
        for k, jpeg in enumerate(jpegs):
            expected = paste(memory[f"bg{k}"], memory["arena"][k], RECTS[k], mode)
            assert jpeg == encode_jpeg(expected, 80)
            assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (120, 160, 3)


def test_a_job_without_predictions_encodes_its_backgrounds_as_they_are() -> None:
    """A live session's idle frames: each background's JPEG, nothing pasted."""
    memory = _memory()
    kept = _kept()
    for _ in range(2):  # encoded, then as kept
        _, *jpegs = composite_job(_job(predictions=None), lambda ref: memory[ref.segment], 0, kept)
        assert jpegs == [encode_jpeg(memory[f"bg{k}"], 80) for k in range(3)]


def test_a_job_that_cannot_be_composited_fails_alone() -> None:
    """Memory that cannot be read gives one FramesFailed naming the frame, not an exception."""
    memory = _memory()

    def view(ref: msg.TensorRef) -> np.ndarray:
        if ref.segment == "bg1":
            raise FileNotFoundError(f"no segment {ref.segment}")
        return memory[ref.segment]

    (only,) = composite_job(_job(), view, 0, _kept())
    failed = msg.frontend_decoder.decode(only)
    assert isinstance(failed, msg.FramesFailed) and (failed.request_id, failed.first_frame) == (5, 2)
    assert failed.error.startswith("failed to composite frame 3: no segment bg1")


def test_a_gone_segment_is_said_once_without_a_traceback(caplog) -> None:
    """Frames of a dead frontend's arena: each job gives its FramesFailed, and the log gets one
    line naming the segment (its first job), not a traceback per frame."""
    import logging

    from pipeline.shm.segment import SegmentGone

    seen: set[str] = set()

    def view(ref: msg.TensorRef) -> np.ndarray:
        first = ref.segment not in seen
        seen.add(ref.segment)
        raise SegmentGone(ref.segment, first)

    with caplog.at_level(logging.INFO):
        replies = [composite_job(_job(), view, 0, _kept()) for _ in range(5)]
    assert all(isinstance(msg.frontend_decoder.decode(r[0]), msg.FramesFailed) for r in replies)
    assert [r.getMessage() for r in caplog.records] == [
        "shared-memory segment arena is gone (its creator released it or exited): dropping the "
        "frames that use it"]
    assert not any(r.exc_info for r in caplog.records)


def test_a_jobs_frames_reuse_one_frame_buffer() -> None:
    """A job pastes its frames one after another into fresh 720p frames; only one may be
    alive at a time, or the allocator maps a new buffer per frame (a 4-frame job cost ~430
    page faults and 40 % more CPU a frame than four 1-frame jobs). Page faults a frame, after
    a warm-up, stay those of a 1-frame job."""
    import resource

    rng = np.random.default_rng(5)
    # smooth frames, as a camera's: their JPEGs are a few tens of KB (noise would make
    # megabyte JPEGs, each a fresh mapping of its own)
    ramp = np.linspace(0, 200, 1280, dtype=np.float32)[None, :, None] + \
        np.linspace(0, 50, 720, dtype=np.float32)[:, None, None]
    memory = {**{f"bg{i}": (ramp + 3 * i).astype(np.uint8).repeat(3, axis=2) for i in range(4)},
              "arena": rng.random((4, 3, 320, 320), np.float32)}
    rects = ((500, 200, 700, 400),) * 4
    job = msg.CompositeJob(
        request_id=1, first_frame=0, predictions=msg.TensorRef("arena", 0, (4, 3, 320, 320), "float32"),
        backgrounds=tuple(msg.TensorRef(f"bg{i}", 0, (720, 1280, 3), "uint8") for i in range(4)),
        rects=rects, mode="synctalk", jpeg_quality=75)

    def faults_a_frame(kept: BackgroundJpegs) -> float:
        for _ in range(3):  # warm: the allocator settles on its buffer
            composite_job(job, lambda ref: memory[ref.segment], 0, kept)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            composite_job(job, lambda ref: memory[ref.segment], 0, kept)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20

    assert faults_a_frame(BackgroundJpegs(0)) < 50  # each frame pasted and encoded whole
    assert faults_a_frame(_kept()) < 50  # the rows around the mouth
