"""A LiveKit Agents avatar worker backed by the server's live mode (extra `[livekit]`):
`lipsync livekit-avatar --url wss://… --token …`.

It joins the room as the avatar participant. The agent streams its speech on the data-stream
topic `lk.audio_stream` and interrupts with the RPC `lk.clear_buffer`; the Agents SDK's
`DataStreamAudioReceiver` takes both, and its `AvatarRunner` publishes our frames and the audio
through the SDK's `AVSynchronizer` and answers the agent (`lk.playback_started`,
`lk.playback_finished`). `LipsyncVideoGenerator` is the SDK's `VideoGenerator`: the audio goes
to one live session, and its frames (25 fps, idle frames between turns) come back as
`rtc.VideoFrame`s, each followed by the `rtc.AudioFrame` it shows.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from livekit import rtc
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarOptions,
    AvatarRunner,
    DataStreamAudioReceiver,
    VideoGenerator,
)

from pipeline.integrations.live import AvatarFrame, LiveAvatar

log = logging.getLogger(__name__)

Output = rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd


class LipsyncVideoGenerator(VideoGenerator):
    """The agent's audio in; the avatar's frames and the same audio, in sync, out."""

    def __init__(self, url: str, *, model: str | None = None, token: str | None = None,
                 sample_rate: int = 24000) -> None:
        self.sample_rate = sample_rate
        self.avatar = LiveAvatar(url, model=model, token=token, sample_rate=sample_rate,
                                 image_format="RGBA", on_frame=self._show, on_error=self._error)
        self._out: asyncio.Queue[Output] = asyncio.Queue()
        self.size: asyncio.Future[tuple[int, int]] | None = None   # (width, height) of frame 1

    async def start(self) -> tuple[int, int]:
        """Open the live session; the avatar's frame size once its first frame came."""
        self.size = asyncio.get_running_loop().create_future()
        await self.avatar.start()
        return await self.size

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            if await self.avatar.end_segment():
                self._out.put_nowait(AudioSegmentEnd())
            return
        await self.avatar.push_audio(bytes(frame.data), frame.sample_rate, frame.num_channels)

    async def clear_buffer(self) -> None:
        """Interrupted: the audio not played yet is dropped here and on the server."""
        await self.avatar.interrupt()
        kept = [f for f in self._drain() if isinstance(f, rtc.VideoFrame)]
        for frame in kept:
            self._out.put_nowait(frame)

    def __aiter__(self) -> AsyncIterator[Output]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[Output]:
        while True:
            yield await self._out.get()

    async def aclose(self) -> None:
        await self.avatar.close()

    def _drain(self) -> list[Output]:
        items = []
        while not self._out.empty():
            items.append(self._out.get_nowait())
        return items

    async def _show(self, frame: AvatarFrame) -> None:
        if frame.image is not None:
            height, width = frame.image.shape[:2]
            if self.size is not None and not self.size.done():
                self.size.set_result((width, height))
            self._out.put_nowait(rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA,
                                                frame.image.tobytes()))
        if frame.audio:
            self._out.put_nowait(rtc.AudioFrame(frame.audio, frame.sample_rate, 1,
                                                len(frame.audio) // 2))
        for _ in range(frame.segments_ended):
            self._out.put_nowait(AudioSegmentEnd())

    async def _error(self, message: str) -> None:
        log.warning("%s", message)


async def run_avatar(room: rtc.Room, generator: LipsyncVideoGenerator,
                     agent_identity: str | None = None) -> None:
    """Serve the agent in `room` (connected) until the room or the runner ends."""
    width, height = await generator.start()
    runner = AvatarRunner(room, audio_recv=DataStreamAudioReceiver(room, sender_identity=agent_identity),
                          video_gen=generator,
                          options=AvatarOptions(video_width=width, video_height=height, video_fps=25,
                                                audio_sample_rate=generator.sample_rate,
                                                audio_channels=1))
    disconnected = asyncio.Event()
    room.on("disconnected", lambda *_: disconnected.set())
    try:
        await runner.start()
        done = asyncio.ensure_future(runner.wait_for_complete())
        await asyncio.wait({done, asyncio.ensure_future(disconnected.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        await runner.aclose()
        await generator.aclose()


async def serve_room(url: str, token: str, generator: LipsyncVideoGenerator,
                     agent_identity: str | None = None) -> None:
    """Join the room at `url` with `token` and serve its agent until the room ends."""
    room = rtc.Room()
    await room.connect(url, token)
    log.info("joined room %s as %s", room.name, room.local_participant.identity)
    try:
        await run_avatar(room, generator, agent_identity)
    finally:
        with contextlib.suppress(Exception):
            await room.disconnect()
