"""Stream sessions driven in-process against a stand-in for the request path (no process, no
socket): the audio buffer, the audio mode's frames and controls, the live session's anchoring,
pacing and interrupts, and the one place sessions are opened and closed."""
from __future__ import annotations

import asyncio
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from pipeline import messages as msg
from pipeline.config import Config, parse_config
from pipeline.frontend.capacity import Admission, FrameBudget, Refused
from pipeline.frontend.inflight import InferResult
from pipeline.frontend.models import Lease
from pipeline.frontend.security import TokenStore
from pipeline.frontend.streaming.audio import AudioBuffer, AudioFormat, StreamError
from pipeline.frontend.streaming.events import Event, FrameReady, Session, SessionEnds
from pipeline.frontend.streaming.live import IdleFrames, LiveSession
from pipeline.frontend.streaming.session import AudioSession
from pipeline.frontend.streaming.sessions import Sessions, SessionSpec, control
from pipeline.frontend.validation import InferInput
from pipeline.protocol import Cancelled, Flushed, Interrupted, Pong, Ready
from pipeline.synctalk import FRAME_SAMPLES, stream_samples


def config(tmp: Path, **streaming: object) -> Config:
    return parse_config({"streaming": streaming,
                         "models": {"demo": {"model_path": "u.onnx", "background_dir": "f",
                                             "crop_rects_path": "r.json", "num_frames": 4}}},
                        base_dir=tmp)


class Frames:
    """The request path, in-process: frame k of a stream renders as b"k"; a background as
    b"idle<i>". Every request is kept; `hold` pauses them."""

    def __init__(self) -> None:
        self.requests: list[InferInput] = []
        self.hold = asyncio.Event()
        self.hold.set()

    async def infer(self, req: InferInput, timeout: float) -> tuple[InferResult, Lease]:
        self.requests.append(req)
        await self.hold.wait()
        done = msg.InferDone(0, 0, 0, 0, 0, 0, 0, 0)
        frames = [str(req.start_frame_idx + i).encode() for i in range(req.batch_size)]
        return InferResult(frames, done, 0, 0, 0, 0, 0), Lease(0, False, 0)

    async def background_jpegs(self, model_id: str, indices: tuple[int, ...],
                          timeout: float) -> list[bytes]:
        return [f"idle{i}".encode() for i in indices]


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []

    async def __call__(self, event: Event) -> None:
        self.events.append((time.monotonic(), event))

    def frames(self) -> list[FrameReady]:
        return [e for _, e in self.events if isinstance(e, FrameReady)]

    def of(self, kind: type) -> list:
        return [e for _, e in self.events if isinstance(e, kind)]


def pcm(seconds: float) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


def test_the_audio_buffer_appends_in_linear_time_and_keeps_the_stream_positions() -> None:
    """10,000 tiny appends hold exactly the stream; dropping the rendered past, padding a
    flush's silence and taking it back keep every stream position right."""
    buffer, chunks = AudioBuffer(), [np.full(16, i, np.float32) for i in range(10_000)]
    for chunk in chunks:
        buffer.append(chunk)
    whole = np.concatenate(chunks)
    assert buffer.end == 160_000
    np.testing.assert_array_equal(buffer.copy(1000, 5000), whole[1000:5000])
    buffer.drop_before(100_000)
    assert buffer.offset == 100_000
    np.testing.assert_array_equal(buffer.copy(100_000, 160_000), whole[100_000:])
    buffer.pad_to(170_000)
    assert buffer.end == 170_000 and not buffer.copy(160_000, 170_000).any()
    buffer.truncate(160_000)
    buffer.append(np.ones(4, np.float32))
    np.testing.assert_array_equal(buffer.copy(159_998, 160_004), [9999, 9999, 1, 1, 1, 1])
    buffer.drop_before(10**9)  # more than it holds: empty, at its end
    assert buffer.offset == buffer.end == 160_004


def test_audio_mode_sends_every_frame_in_order_from_slices_of_the_stream(tmp_path: Path) -> None:
    """One second fed in odd-sized pieces, then a flush: frames 0..24 in order, each batch
    from the stream's slice its frames need, then "flushed" with 25 frames."""
    router, sink = Frames(), Sink()

    async def scenario() -> None:
        session = AudioSession(config(tmp_path), router, "c", "demo", AudioFormat(), sink, 2.0)
        await session.start()
        audio = pcm(1.0)
        for i in range(0, len(audio), 1234):
            await session.feed(audio[i:i + 1234])
        await session.flush()
        await asyncio.wait_for(session.wait_flushed(), 5)
        await session.close()

    asyncio.run(scenario())
    assert [f.index for f in sink.frames()] == list(range(25))
    assert [f.jpeg for f in sink.frames()] == [str(i).encode() for i in range(25)]
    assert all(f.due_epoch_us is None for f in sink.frames())
    assert sink.of(Flushed) == [Flushed(25)]
    for req in router.requests:
        lo, _ = stream_samples(req.start_frame_idx, req.batch_size)
        assert req.stream_offset == lo and not req.live and req.background_indices == ()


def test_many_tiny_chunks_take_linear_time(tmp_path: Path) -> None:
    """A message of 19,000 chunks of 48 samples (57 s of audio): every sample arrives, and
    feeding them takes a fraction of the time a concatenation of the backlog per chunk took
    (~35 GB copied, seconds)."""
    async def scenario() -> tuple[int, float]:
        session = AudioSession(config(tmp_path), Frames(), "c", "demo", AudioFormat(), Sink(), 2.0)
        chunk = bytes(96)
        t0 = time.perf_counter()
        for _ in range(19_000):
            await session.feed(chunk)
        return session.renderer.received, time.perf_counter() - t0

    received, seconds = asyncio.run(scenario())
    assert received == 19_000 * 48
    assert seconds < 1.5, seconds


def test_a_cancel_drops_what_is_queued_and_restarts_the_clock(tmp_path: Path) -> None:
    """A cancel while a batch renders answers "cancelled" with the frames dropped; that
    batch's frames are never sent and the next audio starts again at frame 0."""
    router, sink = Frames(), Sink()

    async def scenario() -> None:
        session = AudioSession(config(tmp_path), router, "c", "demo", AudioFormat(), sink, 2.0)
        await session.start()
        router.hold.clear()
        await session.feed(pcm(1.0))
        await asyncio.sleep(0.05)  # a batch is being rendered
        await session.cancel()
        router.hold.set()
        await session.feed(pcm(0.2))
        await session.flush()
        await asyncio.wait_for(session.wait_flushed(), 5)
        await session.close()

    asyncio.run(scenario())
    (cancelled,) = sink.of(Cancelled)
    assert cancelled.dropped_frames == 25
    assert [f.index for f in sink.frames()] == list(range(5))
    assert sink.of(Flushed) == [Flushed(5)]


def test_a_cancel_racing_the_wake_up_still_ends_the_session(tmp_path: Path) -> None:
    """Audio arriving in the same loop step as close() (the Python 3.11 wait_for race) must
    not leave the session task running: close() returns and the task is done."""

    async def scenario() -> bool:
        session = AudioSession(config(tmp_path), Frames(), "c", "demo", AudioFormat(), Sink(), 2.0)
        await session.start()
        await asyncio.sleep(0.02)       # the task waits for its wake-up
        runner = session.renderer._runner
        assert runner is not None
        session.renderer._wake.set()    # audio arrives in the same step as the close
        try:
            await asyncio.wait_for(session.close(), 3)
        except TimeoutError:
            return False
        return runner.done()

    assert asyncio.run(scenario())


def live_session(cfg: Config, router: Frames, sink: Sink) -> tuple[LiveSession, Admission]:
    admission = Admission(cfg, FrameBudget(cfg))
    ticket = admission.admit("a", live=True)
    return LiveSession(cfg, router, IdleFrames(cfg, router), ticket, "c", "demo", AudioFormat(),
                       sink), admission


def test_live_video_runs_at_25_fps_and_speech_continues_the_walk(tmp_path: Path) -> None:
    """Idle frames from the start, 40 ms apart on the wall clock; an utterance's frames come
    at its anchor, rendered on the backgrounds the walk is at, ahead of batch work (live);
    an interrupt drops the rest at once and idle frames go on."""
    cfg = config(tmp_path, capacity_fps=1000)
    router, sink = Frames(), Sink()

    async def scenario() -> None:
        session, _ = live_session(cfg, router, sink)
        await session.start()
        await asyncio.sleep(0.2)
        await session.feed(pcm(2.0))
        await asyncio.sleep(1.2)
        await session.interrupt()
        await asyncio.sleep(0.4)
        await session.close()

    asyncio.run(scenario())
    frames = sink.frames()
    assert [f.index for f in frames] == list(range(len(frames)))
    assert {b.due_epoch_us - a.due_epoch_us for a, b in pairwise(frames)} == {40_000}
    speech = [f for f in frames if f.speech]
    assert speech and not frames[0].speech and not frames[-1].speech
    assert all(r.live and len(r.background_indices) == r.batch_size for r in router.requests)
    (interrupted,) = sink.of(Interrupted)
    assert interrupted.dropped_frames > 0
    assert not any(f.speech for f in frames if f.index >= interrupted.frame)


def test_audio_right_after_an_interrupt_is_anchored_while_a_batch_still_renders(tmp_path: Path) -> None:
    """An interrupt while a batch of the utterance renders, and audio right behind it (a
    microphone streams on): that audio starts a new utterance at once, at stream frame 0, so
    the next render has its place on the live clock (unanchored, it failed the session)."""
    async def scenario() -> tuple[object, object]:
        session, _ = live_session(config(tmp_path), Frames(), Sink())
        await session.feed(bytes(12800))        # 0.4 s of an utterance: anchored
        first = session.queue.anchor
        session.speech._rendering = True        # a batch of it is being rendered
        await session.interrupt()
        await session.feed(bytes(640))          # 20 ms more, before that render is back
        return first, session.queue.anchor

    first, anchor = asyncio.run(scenario())
    assert first is not None
    assert anchor is not None and anchor.k0 == 0  # type: ignore[attr-defined]


def test_an_interrupt_flood_keeps_one_reservation(tmp_path: Path) -> None:
    """Audio and an interrupt, 40 times: the session's ticket reserves one utterance at most
    (25 frames/s), and nothing once interrupted."""
    async def scenario() -> tuple[float, float]:
        session, admission = live_session(config(tmp_path, capacity_fps=1000), Frames(), Sink())
        most = 0.0
        for _ in range(40):
            await session.feed(pcm(0.1))
            most = max(most, admission.used_fps())
            await session.interrupt()
        return most, admission.used_fps()

    most, after = asyncio.run(scenario())
    assert most == 25 and after == 0


def test_sessions_are_admitted_built_and_released_in_one_place(tmp_path: Path) -> None:
    """A refused session holds nothing; one that cannot start releases its ticket; an open
    one is counted by transport and said "ready"; a reload of the tokens that revokes its
    token ends it (1008), and a closed one watches its token no more."""
    cfg = config(tmp_path, capacity_fps=25, live_speech_share=1.0)
    router = Frames()
    admission = Admission(cfg, FrameBudget(cfg))
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("secret\nother\n")
    tokens = TokenStore(tokens_file)
    sessions = Sessions(cfg, router, admission, IdleFrames(cfg, router), tokens)
    ended: list[tuple[int, str]] = []

    async def end(code: int, reason: str) -> None:
        ended.append((code, reason))

    def spec(live: bool, model: str = "demo") -> SessionSpec:
        return SessionSpec("websocket", "c", model, AudioFormat(), live, "10.0.0.1", "secret")

    async def scenario() -> None:
        sink = Sink()
        async with sessions.open(spec(True), sink, end) as session:
            assert isinstance(sink.events[0][1], Ready) and sink.events[0][1].mode == "live"
            assert sessions.snapshot() == {"sessions": 1, "websocket": 1}
            with pytest.raises(Refused):
                async with sessions.open(spec(True), Sink(), end):
                    pass
            assert len(admission.tickets) == 1 and tokens.watching() == 1
            tokens_file.write_text("other\n")
            tokens.reload()  # SIGHUP: "secret" is revoked
            await asyncio.sleep(0)
            assert ended == [(1008, "token revoked")]
            await control(session, "ping", sink)
            assert sink.of(Pong) == [Pong()]
        assert len(admission.tickets) == 0 and sessions.count() == 0 and tokens.watching() == 0
        with pytest.raises(StreamError, match="not found"):
            async with sessions.open(spec(False, "nosuch"), Sink(), end):
                pass
        assert len(admission.tickets) == 0

    asyncio.run(scenario())


def test_both_modes_are_sessions_of_one_protocol(tmp_path: Path) -> None:
    """The transports see one Session protocol: audio mode and live mode both implement
    every method they call, and a live session's end is an event, not a callback."""
    cfg = config(tmp_path)
    session: Session = AudioSession(cfg, Frames(), "c", "demo", AudioFormat(), Sink(), 2.0)
    live: Session = live_session(cfg, Frames(), Sink())[0]
    for s in (session, live):
        for name in ("start", "feed", "flush", "wait_flushed", "cancel", "interrupt",
                     "finish_batch", "close", "error", "frames_sent", "client_id", "model_id"):
            assert hasattr(s, name), name
    assert SessionEnds(1013, "x").code == 1013
    assert stream_samples(0, 1)[1] > FRAME_SAMPLES  # the look-ahead the anchors allow for
