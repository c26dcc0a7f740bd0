"""The LiveKit avatar worker (`pipeline.integrations.livekit`) at the Agents SDK's level against a
real server: the SDK's own AvatarRunner and DataStreamAudioReceiver around our VideoGenerator,
in a stand-in room (no LiveKit server can run here) that delivers the agent's `lk.audio_stream`
byte streams and RPCs and records the RPCs the worker makes. Real rtc.AudioFrame/VideoFrame
objects throughout; only the room's network side is stood in for."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd

from pipeline.client import speech_like_audio
from pipeline.integrations.live import AvatarFrame
from pipeline.integrations.livekit import LipsyncVideoGenerator, run_avatar

RATE = 24000
AGENT = "agent"


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(**{"streaming.capacity_fps": 10_000})


@dataclass
class Publication:
    async def wait_for_subscription(self) -> None:
        return None


@dataclass
class Agent:
    identity: str = AGENT
    kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    state: int = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
    attributes: dict = field(default_factory=dict)


class Local:
    """The avatar's participant: RPC methods registered, RPCs made (recorded with their time)."""

    identity = "avatar"
    kind = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD

    def __init__(self) -> None:
        self._rpc_handlers: dict = {}
        self.calls: list[tuple[float, str, str]] = []
        self.published: list[object] = []

    def register_rpc_method(self, method: str, handler) -> None:
        self._rpc_handlers[method] = handler

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float | None = None) -> str:
        assert destination_identity == AGENT
        self.calls.append((time.monotonic(), method, payload))
        return "ok"

    async def publish_track(self, track: object, options: object) -> Publication:
        self.published.append(track)
        return Publication()


class Room(rtc.EventEmitter):
    """What AvatarRunner and DataStreamAudioReceiver use of rtc.Room."""

    name = "stand-in"

    def __init__(self) -> None:
        super().__init__()
        self.local_participant = Local()
        self.remote_participants = {AGENT: Agent()}
        self.byte_stream_handlers: dict = {}

    def isconnected(self) -> bool:
        return True

    def register_byte_stream_handler(self, topic: str, handler) -> None:
        self.byte_stream_handlers[topic] = handler

    def call(self, method: str) -> str:
        """The agent calls an RPC method of the avatar."""
        handler = self.local_participant._rpc_handlers[method]
        return handler(rtc.RpcInvocationData(request_id="r", caller_identity=AGENT, payload="",
                                             response_timeout=2.0))

    def stream_audio(self, pcm: bytes) -> None:
        """The agent sends an utterance on lk.audio_stream (as DataStreamAudioOutput does)."""
        self.byte_stream_handlers["lk.audio_stream"](Reader(pcm), AGENT)


class Reader:
    """A byte stream as the SDK hands it to a handler: attributes, then chunks."""

    @dataclass
    class Info:
        attributes: dict
        stream_id: str = "s"

    def __init__(self, pcm: bytes) -> None:
        self.info = Reader.Info({"sample_rate": str(RATE), "num_channels": "1"})
        self.chunks = [pcm[i:i + 4800] for i in range(0, len(pcm), 4800)]

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        return self.chunks.pop(0)


class Recorded(LipsyncVideoGenerator):
    """Our generator, remembering what it made (`made`) and what it handed the runner (`out`),
    and when."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.out: list[tuple[float, object]] = []
        self.made: list[float] = []

    async def _show(self, frame: AvatarFrame) -> None:
        if frame.image is not None:
            self.made.append(time.monotonic())
        await super()._show(frame)

    async def _frames(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        async for item in super()._frames():
            self.out.append((time.monotonic(), item))
            yield item


def utterance(seconds: float, seed: int) -> bytes:
    audio = speech_like_audio(seconds, sample_rate=RATE, seed=seed)
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def test_worker_plays_an_utterance_and_answers_clear_buffer(server) -> None:
    """Video frames of the avatar's size at 25 fps from the start (>= 20 fps made and taken by
    the SDK's runner on this shared machine); an utterance streamed on
    lk.audio_stream comes back as rtc.AudioFrames whole, with lk.playback_started, then
    lk.playback_finished (not interrupted, its full length); lk.clear_buffer during the next one
    is answered by lk.playback_finished (interrupted) within 100 ms, and no audio follows."""
    first, second = utterance(2.0, seed=4), utterance(4.0, seed=5)

    async def run() -> tuple[Room, Recorded, float, float]:
        room = Room()
        generator = Recorded(f"ws://127.0.0.1:{server.ws_port}", sample_rate=RATE)
        worker = asyncio.create_task(run_avatar(room, generator, AGENT))
        await asyncio.sleep(1.0)
        room.stream_audio(first)
        await asyncio.sleep(4.0)
        room.stream_audio(second)
        await asyncio.sleep(1.5)
        cleared = time.monotonic()
        assert room.call("lk.clear_buffer") == "ok"
        await asyncio.sleep(1.5)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        return room, generator, cleared, time.monotonic()

    room, generator, cleared, _ = asyncio.run(run())
    videos = [(t, f) for t, f in generator.out if isinstance(f, rtc.VideoFrame)]
    audios = [(t, f) for t, f in generator.out if isinstance(f, rtc.AudioFrame)]
    calls = room.local_participant.calls
    print(f"{len(videos)} video frames, {len(audios)} audio frames; rpcs "
          f"{[(round(t - cleared, 3), m, p) for t, m, p in calls]}")

    times = [t for t, _ in videos]
    made = generator.made
    print(f"made {len(made) / (made[-1] - made[0]):.1f} fps, taken by the runner "
          f"{len(videos) / (times[-1] - times[0]):.1f} fps")
    # the server's 25 fps, as this process (decoding 1280x720 JPEGs to RGBA) keeps up with them
    # on a shared 2-core machine: 25.1 made, 24.2-25.3 taken alone; 19 made in a whole-suite run
    # under a load average of 15 from other work, hence the browser demo's bound of 20
    assert len(made) / (made[-1] - made[0]) >= 20
    assert len(videos) / (times[-1] - times[0]) >= 20
    assert {(f.width, f.height) for _, f in videos} == {(1280, 720)}
    assert all(f.type == rtc.VideoBufferType.RGBA for _, f in videos)
    assert len(room.local_participant.published) == 2  # the avatar's audio and video tracks

    before = [f for t, f in audios if t < cleared]
    back = b"".join(bytes(f.data) for f in before)
    assert back.startswith(first) and all(f.sample_rate == RATE for f in before)
    started = [t for t, m, _ in calls if m == "lk.playback_started"]
    finished = [(t, json.loads(p)) for t, m, p in calls if m == "lk.playback_finished"]
    assert started and started[0] < finished[0][0]
    assert finished[0][1]["interrupted"] is False
    assert abs(finished[0][1]["playback_position"] - len(first) / 2 / RATE) < 0.05

    (at, interrupted), = [(t, p) for t, p in finished if t > cleared]
    assert interrupted["interrupted"] is True and at - cleared <= 0.1
    assert not [t for t, _ in audios if t > cleared + 0.1]
    assert [t for t in times if t > cleared + 0.5]  # the video goes on


@pytest.mark.parametrize(("extra", "says"), [
    (["--server", "http://localhost:8080"], "not a WebSocket URL"),
    (["--sample-rate", "44101"], "unsupported sample rate 44101"),
    ([], "cannot join the room at ws://127.0.0.1:9"),
])
def test_the_command_says_what_is_wrong_in_one_line(extra: list[str], says: str) -> None:
    """`lipsync livekit-avatar` with a bad server URL, a bad rate or a LiveKit server that is not
    there: exit status 1 and one line naming the problem (no traceback)."""
    # a failed join, several times: the SDK's exit handler used to abort the process after
    # the message now and then (SIGABRT, about 1 run in 12)
    for _ in range(2 if not extra else 1):
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "livekit-avatar", "--url",
                               "ws://127.0.0.1:9", "--token", "t", *extra],
                              capture_output=True, text=True, timeout=120)
        lines = [line for line in done.stderr.splitlines() if line.startswith("lipsync")]
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert len(lines) == 1 and says in lines[0], done.stderr
