"""The compositor's whole work on one CompositeJob, as a pure function over views of
memory: the frames it sends the frontend; no process, no socket."""
from __future__ import annotations

import cv2
import numpy as np

from pipeline import messages as msg
from pipeline.compositor.composite import composite_job, encode_jpeg, paste

BACKGROUND = msg.TensorRef("bg", 0, (120, 160, 3), "uint8")
PREDICTION = msg.TensorRef("arena", 4096, (3, 320, 320), "float32")


def _job(mode: str = "synctalk") -> msg.CompositeJob:
    return msg.CompositeJob(request_id=5, frame_index=2, prediction=PREDICTION,
                            background=BACKGROUND, rect=(40, 20, 104, 84), mode=mode,  # type: ignore[arg-type]
                            jpeg_quality=80)


def _memory() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"bg": rng.integers(0, 255, (120, 160, 3), np.uint8),
            "arena": rng.random((3, 320, 320), np.float32)}


def test_a_job_gives_its_frame_done_and_the_jpeg() -> None:
    """[FrameDone, JPEG]: the header names request, frame and compositor with the timings,
    and the JPEG is the paste of the prediction into the background."""
    memory = _memory()
    for mode in ("synctalk", "stretch"):
        header, jpeg = composite_job(_job(mode), lambda ref: memory[ref.segment], 3)
        done = msg.frontend_decoder.decode(header)
        assert isinstance(done, msg.FrameDone)
        assert (done.request_id, done.frame_index, done.compositor) == (5, 2, 3)
        assert done.paste_ns > 0 and done.jpeg_ns > 0
        expected = paste(memory["bg"], memory["arena"], (40, 20, 104, 84), mode)
        assert jpeg == encode_jpeg(expected, 80)
        assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (120, 160, 3)


def test_a_job_that_cannot_be_composited_fails_alone() -> None:
    """Memory that cannot be read gives one FrameFailed naming the frame, not an exception."""
    def view(ref: msg.TensorRef) -> np.ndarray:
        raise FileNotFoundError(f"no segment {ref.segment}")

    (only,) = composite_job(_job(), view, 0)
    failed = msg.frontend_decoder.decode(only)
    assert isinstance(failed, msg.FrameFailed) and (failed.request_id, failed.frame_index) == (5, 2)
    assert failed.error.startswith("failed to composite frame 2: no segment")


def test_a_gone_segment_is_said_once_without_a_traceback(caplog) -> None:
    """Frames of a dead frontend's arena: each gives its FrameFailed, and the log gets one
    line naming the segment (its first job), not a traceback per frame."""
    import logging

    from pipeline.shm.segment import SegmentGone

    seen: set[str] = set()

    def view(ref: msg.TensorRef) -> np.ndarray:
        first = ref.segment not in seen
        seen.add(ref.segment)
        raise SegmentGone(ref.segment, first)

    with caplog.at_level(logging.INFO):
        replies = [composite_job(_job(), view, 0) for _ in range(5)]
    assert all(isinstance(msg.frontend_decoder.decode(r[0]), msg.FrameFailed) for r in replies)
    assert [r.getMessage() for r in caplog.records] == [
        "shared-memory segment bg is gone (its creator released it or exited): dropping the "
        "frames that use it"]
    assert not any(r.exc_info for r in caplog.records)
