"""The live session's anchoring, driven in-process: where an utterance's frames go on the
live clock."""
from __future__ import annotations

import asyncio
from pathlib import Path

from pipeline.config import parse_config
from pipeline.frontend.capacity import FrameBudget
from pipeline.frontend.streaming.live import Anchor, IdleFrames, LiveSession
from pipeline.frontend.streaming.session import AudioFormat


async def _noop(*_: object) -> None:
    pass


def test_audio_right_after_an_interrupt_is_anchored_while_a_batch_still_renders(tmp_path: Path) -> None:
    """An interrupt while a batch of the utterance renders, and audio right behind it (a
    microphone streams on): that audio starts a new utterance at once, at stream frame 0, so
    the next render has its place on the live clock (unanchored, it failed the session)."""
    cfg = parse_config({"models": {"demo": {"model_path": "u.onnx", "background_dir": "f",
                                            "crop_rects_path": "r.json", "num_frames": 4}}},
                       base_dir=tmp_path)

    async def scenario() -> tuple[Anchor | None, Anchor | None]:
        session = LiveSession(cfg, None, IdleFrames(cfg, None), FrameBudget(cfg),  # type: ignore[arg-type]
                              "c", "demo", AudioFormat(), _noop, _noop, _noop)
        await session.feed(bytes(12800))        # 0.4 s of an utterance: anchored
        first = session.anchor
        session.speech._rendering = True        # a batch of it is being rendered
        await session.interrupt()
        await session.feed(bytes(640))          # 20 ms more, before that render is back
        return first, session.anchor

    first, anchor = asyncio.run(scenario())
    assert first is not None
    assert anchor is not None and anchor.k0 == 0
