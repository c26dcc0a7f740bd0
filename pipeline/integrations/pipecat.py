"""A Pipecat video service backed by the server's live mode (extra `[pipecat]`).

Place it after the TTS and before the output transport:

    Pipeline([transport.input(), stt, llm, tts,
              LipsyncVideoService(url="ws://localhost:8080"), transport.output()])

With the pipeline's StartFrame it opens one live session; from then on it sends the transport
the avatar's frames at 25 fps (idle frames while the bot is silent), and the TTS audio it is
given comes out again together with the frames that show it (so a transport that plays both as
they come keeps them in sync). `InterruptionFrame` / `UserStartedSpeakingFrame` drop the
speech not shown yet; `EndFrame` closes the session once the audio it holds has gone out
(a bot's last words), `CancelFrame` at once. A lost server is an
ErrorFrame upstream and a reconnect: meanwhile the last frame is repeated and the TTS audio
goes on without lips, so the pipeline never stalls.
"""
from __future__ import annotations

from collections import deque

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from pipeline.integrations.live import AvatarFrame, LiveAvatar, SessionRecord, live_url


class LipsyncVideoService(FrameProcessor):
    """TTS audio in; the avatar's frames and the same audio, in sync, out.

    url: the server's WebSocket base (`ws://host:8080`, `wss://…` with TLS); model: the avatar
    (default: the server's `streaming.default_model`); token: for a server with
    `server.auth` (default `$LIPSYNC_TOKEN`); size: (width, height) of the frames pushed
    (default: the avatar's own): set it to the transport's video_out_width/height, and the
    frames come at that size already, scaled while decoded (cheap for a half, a quarter or an
    eighth of the avatar's size), instead of being scaled again by the transport."""

    def __init__(self, *, url: str, model: str | None = None, token: str | None = None,
                 size: tuple[int, int] | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        live_url(url, model)  # a URL that is not ws:// or wss:// is refused here, not later
        self._url, self._model, self._token, self._size = url, model, token, size
        self._avatar: LiveAvatar | None = None
        self._stops: deque[TTSStoppedFrame] = deque()  # each goes after its turn's last audio
        self.record = SessionRecord()  # interrupt confirmations, the server's speech starts

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._avatar = LiveAvatar(self._url, model=self._model, token=self._token,
                                      sample_rate=self._output_rate(frame), size=self._size,
                                      on_frame=self._show, on_error=self._error,
                                      record=self.record)
            await self._avatar.start()
        elif isinstance(frame, EndFrame):
            if self._avatar is not None:
                await self._avatar.drain()  # the last words are heard (and seen) first
            await self._close()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._close()
            await self.push_frame(frame, direction)
        elif (isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM
              and self._avatar is not None):
            await self._avatar.push_audio(frame.audio, frame.sample_rate, frame.num_channels)
        elif isinstance(frame, TTSStoppedFrame) and self._avatar is not None:
            if await self._avatar.end_segment():
                await self.push_frame(frame, direction)
            else:
                self._stops.append(frame)
        elif isinstance(frame, (InterruptionFrame, UserStartedSpeakingFrame)):
            if self._avatar is not None:
                await self._avatar.interrupt()
            await self.push_frame(frame, direction)
            while self._stops:  # their audio is dropped: the turns end now
                await self.push_frame(self._stops.popleft())
        else:
            await self.push_frame(frame, direction)

    def _output_rate(self, frame: StartFrame) -> int:
        """The pipeline's output rate: the audio comes back at it."""
        setup = getattr(self, "_setup", None)
        rate = getattr(setup, "audio_out_sample_rate", None)
        return int(rate) if rate else int(frame.audio_out_sample_rate)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    async def _close(self) -> None:
        if self._avatar is not None:
            await self._avatar.close()
            self._avatar = None

    async def _show(self, frame: AvatarFrame) -> None:
        if frame.image is not None:
            height, width = frame.image.shape[:2]
            image = OutputImageRawFrame(image=frame.image.tobytes(), size=(width, height),
                                        format="RGB")
            # the server's frame index (-1: the last frame, repeated while the server is away),
            # speech or idle, and when its message came (time.monotonic())
            image.metadata["lipsync"] = {"index": frame.index, "speech": frame.speech,
                                         "received": frame.received}
            await self.push_frame(image)
        if frame.audio:
            await self.push_frame(TTSAudioRawFrame(audio=frame.audio, sample_rate=frame.sample_rate,
                                                   num_channels=1))
        for _ in range(frame.segments_ended):
            if self._stops:
                await self.push_frame(self._stops.popleft())

    async def _error(self, message: str) -> None:
        await self.push_error(message)
