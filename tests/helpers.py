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


def write_silent_encoder(path: Path) -> Path:
    """An audio encoder ONNX that hears silence in everything: [B,1,80,16] -> zeros [B,512]
    (a model with it renders the demo UNet's closed mouth)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    zeros = numpy_helper.from_array(np.zeros((80 * 16, 512), np.float32), "zeros")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["mel"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "zeros"], ["features"])], "silent_encoder",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["batch", 1, 80, 16])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 512])], [zeros])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
