"""The stream session's task, driven in-process: it ends whenever it is cancelled."""
from __future__ import annotations

import asyncio
from pathlib import Path

from pipeline.config import parse_config
from pipeline.frontend.streaming.session import AudioFormat, StreamSession


def _config(tmp: Path):
    return parse_config({"models": {"demo": {"model_path": "u.onnx", "background_dir": "f",
                                             "crop_rects_path": "r.json", "num_frames": 4}}},
                        base_dir=tmp)


async def _noop(*_: object) -> None:
    pass


def test_a_cancel_racing_the_wake_up_still_ends_the_session(tmp_path: Path) -> None:
    """Audio arriving in the same loop step as close() (the Python 3.11 wait_for race) must
    not leave the session task running: close() returns and the task is done."""

    async def scenario() -> bool:
        session = StreamSession(_config(tmp_path), router=None, client_id="c",  # type: ignore[arg-type]
                                model_id="demo", fmt=AudioFormat(), send_frame=_noop,
                                send_status=_noop)
        await session.start()
        await asyncio.sleep(0.02)       # the task waits for its wake-up
        runner = session._runner
        assert runner is not None
        session._wake.set()             # audio arrives in the same step as the close
        try:
            await asyncio.wait_for(session.close(), 3)
        except TimeoutError:
            return False
        return runner.done()

    assert asyncio.run(scenario())
