"""The Pipecat video service (`pipeline.integrations.pipecat`) in a real Pipecat pipeline
(Pipecat's own test harness, `pipecat.tests.utils.run_test`) against a real server: what
reaches the transport — frames, the TTS audio back, and when."""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.workers.runner import WorkerRunner

from pipeline.client import speech_like_audio
from pipeline.integrations.pipecat import LipsyncVideoService
from tests.conftest import ops_stats

TTS_RATE = 24000      # the TTS's rate (the pipeline's output rate is Pipecat's default, 24 kHz)
CHUNK_S = 0.02        # TTS audio frames of 20 ms, sent at once (a TTS runs ahead of real time)
FRAME_S = 0.04
# mean |difference| of the lower half of the face box from the background: idle frames (the
# background, JPEG-encoded) about 1, the demo model's renderings 4-10
IDLE_DIFF = 2.5


@pytest.fixture(scope="module")
def server(start_server):
    # admission is not the point here (other tests load the box meanwhile)
    return start_server(**{"streaming.capacity_fps": 10_000})


def utterance(seconds: float, seed: int) -> np.ndarray:
    """Speech-like int16 audio at the TTS rate."""
    audio = speech_like_audio(seconds, sample_rate=TTS_RATE, seed=seed)
    return (np.clip(audio, -1, 1) * 32767).astype(np.int16)


def voiced_chunk(pcm: bytes) -> bool:
    """A chunk of speech rather than a pause (a pause renders a closed mouth, which the judge
    below cannot tell from the background)."""
    samples = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768
    return bool(np.sqrt(np.mean(samples ** 2)) > 0.05)


def tts_frames(audio: np.ndarray) -> list[Frame]:
    step = int(TTS_RATE * CHUNK_S)
    return [TTSAudioRawFrame(audio=audio[i:i + step].tobytes(), sample_rate=TTS_RATE,
                             num_channels=1) for i in range(0, len(audio), step)]


@dataclass
class Seen:
    """What a processor saw, each with the monotonic time it saw it."""

    frames: list[tuple[float, Frame]] = field(default_factory=list)

    def of(self, kind: type | tuple[type, ...]) -> list[tuple[float, Frame]]:
        return [(t, f) for t, f in self.frames if isinstance(f, kind)]


class Recorder(FrameProcessor):
    """Passes every frame on, remembering when each went by in `direction`."""

    def __init__(self, seen: Seen, direction: FrameDirection) -> None:
        super().__init__()
        self.seen, self.direction = seen, direction

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == self.direction:
            self.seen.frames.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)


class MouthJudge:
    """Tells a speech frame from an idle one: the mouth region differs from the background
    the frame shows (the demo avatar's frame counter says which)."""

    def __init__(self, oracle, models_root: Path) -> None:
        self.oracle = oracle
        self.rects = json.loads((models_root / "demo" / "crop_rects.json").read_text())
        self.backgrounds = [cv2.imread(str(models_root / "demo" / "frames" / f"frame_{i:04d}.jpg"))
                            for i in range(len(oracle.corners))]

    def rendered(self, frame: OutputImageRawFrame) -> bool:
        width, height = frame.size
        bgr = cv2.cvtColor(np.frombuffer(frame.image, np.uint8).reshape(height, width, 3),
                           cv2.COLOR_RGB2BGR)
        index = self.oracle.frame(cv2.imencode(".jpg", bgr)[1].tobytes())
        x1, y1, x2, y2 = (int(v) for v in self.rects[index])
        mouth = (slice(y1 + (y2 - y1) // 2, y2), slice(x1, x2))
        diff = np.abs(bgr[mouth].astype(np.float32) - self.backgrounds[index][mouth]).mean()
        return bool(diff > IDLE_DIFF)


async def run_pipeline(server, frames: Sequence[Frame]) -> tuple[LipsyncVideoService, Seen, Seen, Seen]:
    """frames through [recorder, LipsyncVideoService, recorder] in Pipecat's harness; what went
    into the service, what came out downstream, and what went upstream."""
    into, down, up = Seen(), Seen(), Seen()
    service = LipsyncVideoService(url=f"ws://127.0.0.1:{server.ws_port}")
    pipeline = Pipeline([Recorder(up, FrameDirection.UPSTREAM), Recorder(into, FrameDirection.DOWNSTREAM),
                         service, Recorder(down, FrameDirection.DOWNSTREAM)])
    await run_test(pipeline, frames_to_send=frames)
    return service, into, down, up


def check_sync(down: Seen, audio: list[tuple[float, Frame]], spoken: np.ndarray,
               speech_starts: list[int], judge: MouthJudge) -> None:
    """The utterance `spoken` came back as `audio` (frames downstream), in sync with the video:
    each 40 ms went out right after an image (the frame that shows it); the image with the first
    voiced sample is the frame where the server's own voice-activity detector puts the speech's
    start (within one frame: an independent check of which audio a frame shows); the speech frames
    that took voiced audio show a mouth (the rest went with the idle frames the server sent in
    place of speech frames not ready in time: printed, as a measure of the server's load)."""
    order = {id(f): i for i, (_, f) in enumerate(down.frames)}
    shown = [down.frames[order[id(f)] - 1][1] for _, f in audio]
    assert all(isinstance(f, OutputImageRawFrame) for f in shown)
    onset = int(np.argmax(np.abs(spoken) >= 0.05 * 32768)) // int(TTS_RATE * FRAME_S)
    onset_frame = shown[onset].metadata["lipsync"]["index"]
    skew = min((s - onset_frame for s in speech_starts), key=abs)
    voiced = [voiced_chunk(f.audio) for _, f in audio]
    speech = [f.metadata["lipsync"]["speech"] for f in shown]
    print(f"VAD skew {skew} frames; {sum(voiced)} voiced chunks, "
          f"{sum(v and not s for v, s in zip(voiced, speech, strict=True))} with an idle frame")
    assert abs(skew) <= 1
    assert sum(voiced) >= 10
    assert all(judge.rendered(f) for f, v, s in zip(shown, voiced, speech, strict=True)  # type: ignore[arg-type]
               if v and s)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_frames_audio_sync_interrupt_and_close(server, oracle, small_models_root: Path) -> None:
    """Idle frames from the start, then 25 fps (every frame of the server's clock, gaps of at
    most 120 ms at p99); an utterance's TTS audio comes back whole, 40 ms after each frame, in
    sync; other frames pass through; after an interrupt no speech frame or audio later than
    100 ms; after EndFrame the server holds no session."""
    first, second = utterance(2.0, seed=1), utterance(3.0, seed=2)
    frames = [SleepFrame(1.0), TextFrame("hello"), *tts_frames(first), TTSStoppedFrame(), SleepFrame(4.0),
              *tts_frames(second), TTSStoppedFrame(), SleepFrame(1.8), InterruptionFrame(),
              SleepFrame(1.5)]
    service, into, down, up = asyncio.run(run_pipeline(server, frames))
    judge = MouthJudge(oracle, small_models_root)
    images = down.of(OutputImageRawFrame)
    audio_out = down.of(TTSAudioRawFrame)
    audio_in = into.of(TTSAudioRawFrame)
    interrupt_at = into.of(InterruptionFrame)[0][0]

    # 25 fps the whole time, every frame of the server's clock passed on at once; the gaps the
    # transport sees are printed (on a shared machine a stalled server shows there too)
    times = [t for t, _ in images]
    meta = [f.metadata["lipsync"] for _, f in images]
    held = [(t - m["received"]) * 1000 for t, m in zip(times, meta, strict=True)]
    print(f"{len(images)} frames, {len(images) / (times[-1] - times[0]):.1f} fps; gaps max "
          f"{max(gaps(times)) * 1000:.0f} ms, p99 {np.percentile(gaps(times), 99) * 1000:.0f} ms; "
          f"held in the service max {max(held):.1f} ms; interrupt confirmed in "
          f"{[round(a * 1000, 1) for a in service.record.interrupt_acks]} ms")
    assert [m["index"] for m in meta] == list(range(meta[0]["index"], meta[-1]["index"] + 1))
    # the service holds no frame longer than its JPEG decode (a stall of the shared machine aside)
    assert np.percentile(held, 99) <= 120 and max(held) <= 500
    # p99 is the pacing; the longest gap only bounds a stall (the suite's other workers share
    # the 2 cores: 0.68 s was seen once there), as in the restart test below
    assert np.percentile(gaps(times), 99) <= 0.120 and max(gaps(times)) <= 1.0
    assert len(images) / (times[-1] - times[0]) >= 24.0
    before = [f for t, f in images if t < audio_in[0][0]]
    assert len(before) >= 20 and not any(judge.rendered(f) for f in before)
    assert images[0][1].size == (judge.backgrounds[0].shape[1], judge.backgrounds[0].shape[0])

    # the first utterance comes back whole (padded to a whole frame), 40 ms per frame, each
    # 40 ms with a speech frame (pushed with it: the frame just before it downstream)
    first_out = [(t, f) for t, f in audio_out if t < audio_in[len(tts_frames(first))][0]]
    back = b"".join(f.audio for _, f in first_out)
    per_frame = int(TTS_RATE * FRAME_S) * 2
    assert back[:first.nbytes] == first.tobytes() and not any(back[first.nbytes:])
    assert len(back) == -(-first.nbytes // per_frame) * per_frame
    assert all(len(f.audio) == per_frame and f.sample_rate == TTS_RATE for _, f in first_out)
    check_sync(down, first_out, first, service.record.speech_starts, judge)
    audio_times = [t for t, _ in first_out]
    # 40 ms a frame, at the frames' pace (not in a burst)
    assert len(audio_times) / (audio_times[-1] - audio_times[0] + FRAME_S) <= 26
    # its TTSStoppedFrame follows its last audio
    stop_at = next(t for t, _ in down.of(TTSStoppedFrame))
    assert stop_at >= audio_times[-1]

    # interrupt: nothing of the second utterance later than 100 ms after the InterruptionFrame
    late_audio = [t for t, _ in audio_out if t > interrupt_at + 0.1]
    late_speech = [t for t, f in images if t > interrupt_at + 0.1 and judge.rendered(f)]
    assert any(t < interrupt_at for t, _ in audio_out if t > audio_in[len(tts_frames(first))][0])
    assert late_audio == [] and late_speech == []
    assert [t for t, f in images if t > interrupt_at + 0.2]  # the video goes on
    assert not up.of(ErrorFrame)
    assert [f.text for _, f in down.of(TextFrame)] == ["hello"]  # other frames pass through

    # EndFrame closed the session
    deadline = time.monotonic() + 5
    while ops_stats(server.config)["frontend"]["websocket_sessions"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ops_stats(server.config)["frontend"]["websocket_sessions"] == 0


def test_end_frame_lets_the_last_words_out_first(server) -> None:
    """An EndFrame right after a turn's audio: the whole turn comes out (audio, then its
    TTSStoppedFrame) before the EndFrame goes on."""
    last = utterance(1.5, seed=9)
    _, _, down, _ = asyncio.run(run_pipeline(server, [SleepFrame(0.5), *tts_frames(last),
                                                     TTSStoppedFrame()]))
    ended = next(t for t, f in down.frames if isinstance(f, EndFrame))
    audio = down.of(TTSAudioRawFrame)
    assert b"".join(f.audio for _, f in audio)[:last.nbytes] == last.tobytes()
    assert audio[-1][0] <= next(t for t, _ in down.of(TTSStoppedFrame)) <= ended


Send = Callable[[Frame], Awaitable[None]]


async def drive(pipeline: Pipeline, script: Callable[[Send], Awaitable[None]]) -> None:
    """Run `pipeline` as Pipecat's run_test does, frames sent by `script(send)` as it goes (a
    conversation that waits on events, not a list fixed in advance), then EndFrame."""
    worker = PipelineWorker(pipeline, cancel_on_idle_timeout=False)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker: object, _frame: object) -> None:
        started.set()

    async def conversation() -> None:
        await asyncio.wait_for(started.wait(), 10)
        await script(worker.queue_frame)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), conversation())


def test_a_server_restart_mid_conversation_is_survived(start_server, oracle,
                                                       small_models_root: Path) -> None:
    """The server stops after the first utterance and comes back: an ErrorFrame goes upstream,
    the last frame is repeated meanwhile (the video never stops), and the next utterance is
    shown lip-synced by the new server with its audio back whole."""
    server = start_server(**{"streaming.capacity_fps": 10_000})
    first, second = utterance(1.5, seed=6), utterance(2.0, seed=7)
    into, down, up = Seen(), Seen(), Seen()
    spoke: list[float] = []

    async def script(send: Send) -> None:
        await asyncio.sleep(1.0)
        for frame in [*tts_frames(first), TTSStoppedFrame()]:
            await send(frame)
        await asyncio.sleep(3.5)
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(1.0)  # frames while it is away
        await asyncio.to_thread(server.start)
        # the service's next attempt (backoff 0.5, 1, 2 s): the utterance goes to the new
        # server, not into the outage (whose audio plays with the held frame, by design)
        async with asyncio.timeout(10):
            while not service.record.reconnects:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        spoke.append(time.monotonic())
        for frame in [*tts_frames(second), TTSStoppedFrame()]:
            await send(frame)
        await asyncio.sleep(4.0)

    service = LipsyncVideoService(url=f"ws://127.0.0.1:{server.ws_port}")
    asyncio.run(drive(Pipeline([Recorder(up, FrameDirection.UPSTREAM),
                                Recorder(into, FrameDirection.DOWNSTREAM), service,
                                Recorder(down, FrameDirection.DOWNSTREAM)]), script))
    judge = MouthJudge(oracle, small_models_root)
    images = down.of(OutputImageRawFrame)
    times = [t for t, _ in images]
    errors = up.of(ErrorFrame)
    print(f"{len(images)} frames; gaps max {max(gaps(times)) * 1000:.0f} ms, p99 "
          f"{np.percentile(gaps(times), 99) * 1000:.0f} ms; errors {[f.error for _, f in errors]}")
    assert errors and "lost" in errors[0][1].error
    # the video never froze, the server's outage and restart included
    assert max(gaps(times)) <= 1.0 and len(images) / (times[-1] - times[0]) >= 23
    after = [(t, f) for t, f in down.of(TTSAudioRawFrame) if t > spoke[0]]
    back = b"".join(f.audio for _, f in after)
    assert back[:second.nbytes] == second.tobytes()
    assert service.record.reconnects >= 1
    check_sync(down, after[: -(-second.nbytes // (2 * int(TTS_RATE * FRAME_S)))], second,
               service.record.speech_starts, judge)
