"""Crop rectangles from landmarks by SyncTalk-2D's rule, checked against their frames, with
optional smoothing; a frame without usable landmarks is refused by name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.importer.landmarks import LandmarkError, crop_rect, crop_rects, read_landmarks, smooth


def _lms(path: Path, x1: float, y1: float, x2: float, other: float = 100.0) -> Path:
    points = np.full((98, 2), other)
    points[1, 0], points[52, 1], points[31, 0] = x1, y1, x2
    path.write_text("".join(f"{x:.6f} {y:.6f}\n" for x, y in points))
    return path


def test_the_rule_reads_landmarks_1_52_31_and_truncates(tmp_path: Path) -> None:
    """x1 = lms[1].x, y1 = lms[52].y, x2 = lms[31].x, y2 = y1 + (x2 - x1), each cast to
    int as SyncTalk-2D casts float32 (toward zero)."""
    path = _lms(tmp_path / "0.lms", 238.9, 122.99, 401.5)
    assert crop_rect(read_landmarks(path, 0)) == (238, 122, 401, 122 + 163)


def test_rects_are_checked_against_their_frames(tmp_path: Path) -> None:
    """Every rectangle inside its frame passes (touching the edge included); one outside is
    refused naming its frame and file."""
    paths = [_lms(tmp_path / "0.lms", 10, 10, 50), _lms(tmp_path / "1.lms", 60, 20, 100)]
    rects = crop_rects(paths, [(100, 100), (100, 100)])
    assert rects.tolist() == [[10, 10, 50, 50], [60, 20, 100, 60]]
    with pytest.raises(LandmarkError, match=r"frame 1: its crop rectangle \[60, 20, 100, 60\] "
                                            r"\(from .*1\.lms\) does not lie inside the 90x100"):
        crop_rects(paths, [(100, 100), (90, 100)])


def test_an_empty_rect_is_refused(tmp_path: Path) -> None:
    """Landmarks whose x2 is left of x1 give no rectangle: refused, naming the frame."""
    with pytest.raises(LandmarkError, match="frame 0: its crop rectangle"):
        crop_rects([_lms(tmp_path / "0.lms", 50, 10, 40)], [(100, 100)])


def test_missing_or_malformed_landmarks_name_the_frame(tmp_path: Path) -> None:
    """No .lms file, too few lines, or text that is not numbers: one line naming the frame."""
    with pytest.raises(LandmarkError, match=r"frame 3 has no landmarks \(.*3\.lms is missing\)"):
        read_landmarks(tmp_path / "3.lms", 3)
    short = tmp_path / "4.lms"
    short.write_text("1 2\n3 4\n")
    with pytest.raises(LandmarkError, match=r"frame 4: .*must hold 98 lines"):
        read_landmarks(short, 4)
    words = _lms(tmp_path / "5.lms", 1, 2, 3)
    words.write_text(words.read_text().replace("100.000000", "nan", 1).replace("1.0", "x", 1))
    with pytest.raises(LandmarkError, match="frame 5: "):
        read_landmarks(words, 5)


def test_smoothing_is_a_centred_moving_average(tmp_path: Path) -> None:
    """--smooth N averages each rectangle over N frames around it (fewer at the ends),
    truncated; 1 leaves them alone."""
    rects = np.array([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10], [30, 0, 40, 10]], np.int32)
    assert smooth(rects, 1) is rects
    np.testing.assert_array_equal(smooth(rects, 3)[:, 0], [1, 3, 13, 18])
    np.testing.assert_array_equal(smooth(rects, 3)[:, 2], [11, 13, 23, 28])
