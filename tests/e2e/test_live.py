"""Live mode on the real server: a continuous 25 fps video of idle frames (the avatar's own
background walking back and forth) and speech frames that continue the walk, with their
index, speech flag and due time; speech events; an interrupt that takes effect at once;
admission against the frame budget."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from itertools import pairwise

import grpc
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from pipeline.client import FrameMessage, channel, parse_frame_message, speech_like_audio
from pipeline.frontend.streaming.pacer import ping_pong
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.conftest import SMALL_FRAMES, ops_stats


@pytest.fixture(scope="module")
def server(start_server):
    # admission has its own test below: here every live session is admitted
    return start_server(**{"streaming.capacity_fps": 10_000})


def pcm16(seconds: float, seed: int = 0) -> bytes:
    return (np.clip(speech_like_audio(seconds, seed=seed), -1, 1) * 32767).astype("<i2").tobytes()


def silence(seconds: float) -> bytes:
    return bytes(2 * int(16000 * seconds))


@dataclass
class Received:
    frames: list[tuple[float, FrameMessage]] = field(default_factory=list)
    statuses: list[tuple[float, dict]] = field(default_factory=list)

    def of(self, kind: str) -> list[dict]:
        return [s for _, s in self.statuses if s["type"] == kind]


async def collect(ws: ClientConnection, into: Received, until: float) -> None:
    """Everything the server sends until the monotonic time `until`."""
    while (left := until - time.monotonic()) > 0:
        try:
            async with asyncio.timeout(left):
                message = await ws.recv()
        except TimeoutError:
            return
        now = time.monotonic()
        if isinstance(message, str):
            into.statuses.append((now, json.loads(message)))
        else:
            into.frames.append((now, parse_frame_message(message)))


async def send_paced(ws: ClientConnection, audio: bytes, chunk: int = 1280) -> None:
    """Audio at real-time pace, 40 ms a message."""
    t0 = time.monotonic()
    for k, i in enumerate(range(0, len(audio), chunk)):
        await ws.send(audio[i:i + chunk])
        await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.04 - time.monotonic()))


def live_url(server, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.ws_port}/audio?mode=live{query}"


def test_idle_frames_walk_the_background_on_the_wall_clock(server, oracle) -> None:
    """No audio: idle frames only, indices from 0 with no gap, due 40 ms apart on the wall
    clock and sent then, each the background frame of the ping-pong walk."""
    async def run() -> tuple[dict, Received]:
        async with connect(live_url(server)) as ws:
            ready = json.loads(await ws.recv())
            got = Received()
            await collect(ws, got, time.monotonic() + 3.5)  # the first encodes idle frames
            return ready, got

    ready, got = asyncio.run(run())
    assert ready["mode"] == "live"
    frames = [f for _, f in got.frames]
    assert len(frames) >= 50
    assert [f.index for f in frames] == list(range(len(frames)))
    assert not any(f.speech for f in frames)
    assert {b.due_epoch_us - a.due_epoch_us for a, b in pairwise(frames)} == {40_000}
    assert [f.pts_us for f in frames] == [40_000 * f.index for f in frames]
    assert [oracle.frame(f.jpeg) for f in frames] == [ping_pong(f.index, SMALL_FRAMES)
                                                       for f in frames]
    # frames leave at their due time (server and client share this machine's clock): none
    # ahead of it, so never bunched; a late one (a busy machine) is no failure here
    epoch = time.time() - time.monotonic()
    early_ms = [(f.due_epoch_us / 1e6 - (t + epoch)) * 1e3 for t, f in got.frames]
    assert max(early_ms) < 5, early_ms


def test_speech_continues_the_walk_and_speech_events_mark_it(server, oracle) -> None:
    """Speech audio at real-time pace: speech frames follow idle frames with consecutive
    indices, each on the background the walk is at; speech_start and speech_end bracket
    them; idle frames go on after."""
    async def run() -> Received:
        async with connect(live_url(server)) as ws:
            await ws.recv()
            got = Received()
            reader = asyncio.create_task(collect(ws, got, time.monotonic() + 6.0))
            await asyncio.sleep(0.5)
            await send_paced(ws, silence(0.3) + pcm16(1.5) + silence(0.6))
            await reader
            return got

    got = asyncio.run(run())
    frames = [f for _, f in got.frames]
    assert [f.index for f in frames] == list(range(len(frames)))
    speech = [f for f in frames if f.speech]
    assert len(speech) >= 30
    assert not frames[-1].speech  # idle again after the utterance
    assert [oracle.frame(f.jpeg) for f in frames] == [ping_pong(f.index, SMALL_FRAMES)
                                                       for f in frames]
    (start,), ends = got.of("speech_start"), got.of("speech_end")
    assert len(ends) == 1
    assert speech[0].index - 15 <= start["frame"] <= speech[0].index + 15
    assert start["frame"] < ends[0]["frame"] <= speech[-1].index + 1


def test_an_interrupt_takes_effect_at_once_and_idle_goes_on(server) -> None:
    """4 s of speech sent at once, then an interrupt while it plays: one "interrupted"
    answer, no speech frame later than 100 ms after it, idle frames after it."""
    async def run() -> tuple[float, Received]:
        async with connect(live_url(server)) as ws:
            await ws.recv()
            got = Received()
            reader = asyncio.create_task(collect(ws, got, time.monotonic() + 4.0))
            await ws.send(pcm16(4.0, seed=2))
            while not any(f.speech for _, f in got.frames):
                assert not reader.done(), "no speech frame in 4 s"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            sent = time.monotonic()
            await ws.send(json.dumps({"type": "interrupt"}))
            await reader
            return sent, got

    sent, got = asyncio.run(run())
    (interrupted,) = got.of("interrupted")
    assert interrupted["dropped_frames"] > 20  # most of the 4 s had not been shown
    late = [t - sent for t, f in got.frames if f.speech and t > sent]
    assert max(late, default=0.0) <= 0.1, late
    after = [f for t, f in got.frames if t > sent + 0.1]
    assert len(after) >= 20 and not any(f.speech for f in after)


def test_stream_audio_live_mode_and_interrupt(server) -> None:
    """StreamAudio with mode "live": frames carry the speech flag and their due time, the
    INTERRUPT control answers "interrupted" and the video goes on."""
    audio = pcm16(3.0, seed=4)

    def requests():
        yield pb.StreamAudioRequest(config=pb.StreamConfig(model_id="demo", mode="live"))
        yield pb.StreamAudioRequest(audio=audio)
        time.sleep(1.6)
        yield pb.StreamAudioRequest(control=pb.STREAM_CONTROL_INTERRUPT)
        time.sleep(1.0)

    frames, statuses = [], []
    with channel(server.address) as ch:
        for r in pb_grpc.MonolithicServiceStub(ch).StreamAudio(requests(), timeout=30):
            if r.WhichOneof("message") == "frame":
                frames.append(r.frame)
            else:
                statuses.append(json.loads(r.status_json))
    assert statuses[0]["mode"] == "live"
    assert [f.frame_index for f in frames] == list(range(len(frames)))
    assert {b.due_epoch_us - a.due_epoch_us for a, b in pairwise(frames)} == {40_000}
    assert any(f.speech for f in frames) and not frames[-1].speech
    assert [s["type"] for s in statuses].count("interrupted") == 1


def test_live_sessions_beyond_the_frame_budget_are_refused(start_server) -> None:
    """streaming.capacity_fps 40: one speaking live session fits (25 frames/s); while it
    speaks a second is closed with 1013 and a reason, and a live StreamAudio gets
    RESOURCE_EXHAUSTED; the ops socket shows the budget and the refusals. A silent session
    renders nothing: before the first speaks, a second one is admitted. But each open session
    is expected to speak half the time (12.5 frames/s): a 4th silent one does not fit."""
    srv = start_server(**{"streaming.capacity_fps": 40, "streaming.live_speech_share": 0.5})

    async def expected_speech() -> tuple[int | None, str]:
        async with connect(live_url(srv)) as a, connect(live_url(srv)) as b, \
                connect(live_url(srv)) as c:
            for ws in (a, b, c):
                assert json.loads(await ws.recv())["type"] == "ready"
            fourth = await connect(live_url(srv))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await fourth.recv()
        deadline = time.monotonic() + 10  # closed sessions free their share
        while ops_stats(srv.config)["capacity"]["live_sessions"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        return closed.value.rcvd.code, closed.value.rcvd.reason

    code, reason = asyncio.run(expected_speech())
    assert code == 1013 and "3 live x 12.5 fps expected of 40" in reason

    def grpc_live() -> grpc.StatusCode:
        with channel(srv.address) as ch:
            try:
                list(pb_grpc.MonolithicServiceStub(ch).StreamAudio(iter([
                    pb.StreamAudioRequest(config=pb.StreamConfig(mode="live"))]), timeout=10))
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    async def run() -> tuple[int | None, str, grpc.StatusCode]:
        async with connect(live_url(srv)) as first:
            await first.recv()
            async with connect(live_url(srv)) as silent:
                assert json.loads(await silent.recv())["type"] == "ready"
            while not isinstance(await first.recv(), bytes):
                pass  # its video runs: it reads what it is sent
            await first.send(pcm16(0.5))
            await asyncio.sleep(0.3)  # the utterance has begun
            second = await connect(live_url(srv))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await second.recv()
            code = await asyncio.to_thread(grpc_live)
            return closed.value.rcvd.code, closed.value.rcvd.reason, code

    code, reason, grpc_code = asyncio.run(run())
    assert code == 1013 and "capacity" in reason
    assert grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    capacity = ops_stats(srv.config)["capacity"]
    assert capacity["budget_fps"] == 40 and capacity["refused"] == 3


async def _live_cycle(url: str, ending: str, seed: int) -> None:
    """One live session that ends one hostile way. It reads nothing more: once 16 messages
    wait unread the client stops reading the socket, so its close is not answered in time
    and it drops the connection after 0.5 s (an abrupt end, hostile too)."""
    async with connect(url, close_timeout=0.5) as ws:
        await ws.recv()
        await ws.send(pcm16(0.6, seed))  # 4 frames: a render under way, and little to render
        if ending == "interrupt in flight":  # a render of it is under way
            await ws.send(json.dumps({"type": "interrupt"}))
        elif ending == "interrupt flood":
            for _ in range(20):
                await ws.send(json.dumps({"type": "interrupt"}))
        else:  # "disconnect mid-speech": leave once speech is on screen (or would have been:
            # a loaded box shows idle frames for speech rendered too late)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3.0):
                    while True:
                        message = await ws.recv()
                        if isinstance(message, bytes) and parse_frame_message(message).speech:
                            break
        await asyncio.sleep(0.05)


def test_live_sessions_leave_nothing_behind(server) -> None:
    """200 live sessions that disconnect mid-speech, interrupt while a render is in flight,
    or flood interrupts: afterwards no session, no arena block and no extra task remain."""
    before = ops_stats(server.config)["frontend"]["tasks"]
    endings = ["disconnect mid-speech", "interrupt in flight", "interrupt flood"]

    async def run() -> None:
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with gate:
                await _live_cycle(live_url(server), endings[i % 3], i)

        await asyncio.gather(*(one(i) for i in range(200)))

    asyncio.run(run())
    deadline = time.monotonic() + 15
    while True:
        stats = ops_stats(server.config)
        done = (stats["frontend"]["websocket_sessions"] == 0 and stats["arena"]["blocks"] == 0
                and stats["frontend"]["tasks"] <= before)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["frontend"]["websocket_sessions"] == 0
    assert stats["arena"]["blocks"] == 0
    assert stats["frontend"]["tasks"] <= before, (stats["frontend"]["tasks"], before)


def test_silent_frames_are_not_rendered_when_asked(start_server) -> None:
    """streaming.skip_silent_frames: audio of 1 s silence, 1 s speech, 1 s silence at
    real-time pace: the silence shows idle frames and is not rendered (the server renders
    far fewer than the 75 frames of the audio), the speech shows speech frames."""
    srv = start_server(**{"streaming.skip_silent_frames": True,
                          "streaming.capacity_fps": 10_000})

    async def run() -> Received:
        async with connect(live_url(srv)) as ws:
            await ws.recv()
            got = Received()
            reader = asyncio.create_task(collect(ws, got, time.monotonic() + 6.0))
            await send_paced(ws, silence(1.0) + pcm16(1.0) + silence(1.0))
            await ws.send(json.dumps({"type": "flush"}))
            await reader
            return got

    before = ops_stats(srv.config)["frames"]
    got = asyncio.run(run())
    rendered = ops_stats(srv.config)["frames"] - before
    speech = [f for _, f in got.frames if f.speech]
    assert 15 <= len(speech) <= 50, len(speech)
    assert rendered < 60, rendered  # 75 frames of audio: the silence was skipped
    assert rendered >= len(speech)
