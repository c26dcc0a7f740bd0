"""What end-to-end tests share: which background frame a JPEG shows, and starting servers."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.demo.assets import COUNTER_BOX


class FrameOracle:
    """Tells which background frame of a demo avatar a composited JPEG shows, from the frame
    counter drawn in its corner (far from the face, so the mouth does not touch it)."""

    def __init__(self, frames_dir: Path, count: int) -> None:
        x1, y1, x2, y2 = COUNTER_BOX
        self.corners = np.stack([cv2.imread(str(frames_dir / f"frame_{i:04d}.jpg"))[y1:y2, x1:x2]
                                 for i in range(count)]).astype(np.float32)

    @classmethod
    def of(cls, models_root: Path, count: int) -> FrameOracle:
        return cls(models_root / "demo" / "frames", count)

    def frame(self, jpeg: bytes) -> int:
        x1, y1, x2, y2 = COUNTER_BOX
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        corner = image[y1:y2, x1:x2].astype(np.float32)
        return int(np.argmin(np.abs(self.corners - corner).mean(axis=(1, 2, 3))))

    def frames(self, jpegs: list[bytes]) -> list[int]:
        return [self.frame(j) for j in jpegs]
