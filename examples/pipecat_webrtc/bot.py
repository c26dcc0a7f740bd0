"""A talking avatar in the browser: a Pipecat pipeline with SmallWebRTCTransport (peer-to-peer
WebRTC over aiortc, no cloud service) whose video is this lip-sync server's avatar.

A WAV file stands in for the TTS of a real agent (no LLM, no API key): every `--every` seconds
the bot "says" it. Run, with `lipsync serve` running and the `[pipecat]` extra installed:

    .venv/bin/python examples/pipecat_webrtc/bot.py --wav speech.wav

and open http://127.0.0.1:7860 (press Connect; the page asks for the microphone, which WebRTC
needs for a two-way call, but the bot does not listen). Without --wav it says a built-in
speech-like sound. In a real agent, put LipsyncVideoService between the TTS and
transport.output() the same way.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import numpy as np
import soundfile
from aiohttp import web
from pipecat.frames.frames import (
    Frame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from pipeline.client import speech_like_audio
from pipeline.integrations.pipecat import LipsyncVideoService

PAGE = Path(__file__).with_name("index.html")
log = logging.getLogger("bot")


def load_speech(wav: Path | None) -> tuple[np.ndarray, int]:
    """The bot's line: int16 mono and its rate."""
    if wav is None:
        rate = 24000
        audio = speech_like_audio(3.0, sample_rate=rate, seed=3)
    else:
        audio, rate = soundfile.read(str(wav), dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
    return (np.clip(audio, -1, 1) * 32767).astype(np.int16), int(rate)


class WavSpeaker(FrameProcessor):
    """Says its line every `every` seconds, as a TTS would: TTSStartedFrame, the audio in 20 ms
    frames (all at once: a TTS runs ahead of real time), TTSStoppedFrame."""

    def __init__(self, audio: np.ndarray, rate: int, every: float) -> None:
        super().__init__()
        self.audio, self.rate, self.every = audio, rate, every
        self._task: asyncio.Task[None] | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame) and self._task is None:
            self._task = self.create_task(self._speak())

    async def _speak(self) -> None:
        step = self.rate // 50
        while True:
            await asyncio.sleep(1.0)
            await self.push_frame(TTSStartedFrame())
            for i in range(0, len(self.audio), step):
                await self.push_frame(TTSAudioRawFrame(audio=self.audio[i:i + step].tobytes(),
                                                       sample_rate=self.rate, num_channels=1))
            await self.push_frame(TTSStoppedFrame())
            await asyncio.sleep(max(0.0, self.every - 1.0))

    async def cleanup(self) -> None:
        await super().cleanup()
        if self._task is not None:
            await self.cancel_task(self._task)


async def run_bot(connection: SmallWebRTCConnection, args: argparse.Namespace) -> None:
    audio, rate = load_speech(args.wav)
    transport = SmallWebRTCTransport(webrtc_connection=connection, params=TransportParams(
        audio_in_enabled=False, audio_out_enabled=True, audio_out_sample_rate=rate,
        video_out_enabled=True, video_out_is_live=True, video_out_framerate=25,
        video_out_width=args.width, video_out_height=args.height))
    pipeline = Pipeline([WavSpeaker(audio, rate, args.every),
                         LipsyncVideoService(url=args.server, model=args.model,
                                             size=(args.width, args.height)),
                         transport.output()])
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_out_sample_rate=rate))

    @transport.event_handler("on_client_disconnected")
    async def _gone(_transport: object, _client: object) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def make_app(args: argparse.Namespace) -> web.Application:
    bots: set[asyncio.Task[None]] = set()

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    async def offer(request: web.Request) -> web.Response:
        body = await request.json()
        connection = SmallWebRTCConnection()
        await connection.initialize(sdp=body["sdp"], type=body["type"])
        task = asyncio.create_task(run_bot(connection, args))
        bots.add(task)
        task.add_done_callback(bots.discard)
        return web.json_response(connection.get_answer())

    async def stop(_: web.Application) -> None:
        for task in bots:
            task.cancel()
        await asyncio.gather(*bots, return_exceptions=True)

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/api/offer", offer)
    app.on_shutdown.append(stop)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="ws://127.0.0.1:8080",
                        help="the lip-sync server's WebSocket base")
    parser.add_argument("--model", help="the avatar (default: the server's default model)")
    parser.add_argument("--wav", type=Path, help="the bot's line (default: a built-in sound)")
    parser.add_argument("--every", type=float, default=6.0, help="seconds between its lines")
    parser.add_argument("--width", type=int, default=1280,
                        help="the video's width (default: the demo avatar's)")
    parser.add_argument("--height", type=int, default=720, help="the video's height")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    web.run_app(make_app(args), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
