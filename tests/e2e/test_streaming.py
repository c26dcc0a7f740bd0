"""Streaming on the real server: WebSocket /audio, StreamAudio and ProcessAudio."""
from __future__ import annotations

import asyncio
import json
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pipeline.bench.local_server import ServerProcess
from pipeline.client import channel, parse_frame_message, speech_like_audio
from pipeline.rpc import inference_pb2 as ipb
from pipeline.rpc import inference_pb2_grpc as ipb_grpc
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.conftest import write_config

MAX_CLIENTS = 3


@pytest.fixture(scope="module")
def server(start_server):
    os.environ["MAX_CLIENTS"] = str(MAX_CLIENTS)  # the seed's variable, read at start
    try:
        return start_server(**{"streaming.rate_limit_messages_per_s": 25,
                               "streaming.max_message_bytes": 65536})
    finally:
        del os.environ["MAX_CLIENTS"]


def url(server: ServerProcess, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.ws_port}/audio{query}"


def pcm16(seconds: float, seed: int = 0) -> bytes:
    audio = speech_like_audio(seconds, seed=seed)
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


async def stream(ws, audio: bytes, chunk: int = 1280) -> tuple[dict[int, bytes], list[dict]]:
    """Send audio in chunks, flush, and collect frames and status messages until flushed."""
    for i in range(0, len(audio), chunk):
        await ws.send(audio[i:i + chunk])
    await ws.send(json.dumps({"type": "flush"}))
    frames: dict[int, bytes] = {}
    statuses: list[dict] = []
    while True:
        message = await asyncio.wait_for(ws.recv(), 60)
        if isinstance(message, str):
            statuses.append(json.loads(message))
            if statuses[-1]["type"] in ("flushed", "error"):
                return frames, statuses
        else:
            frame = parse_frame_message(message)
            index, pts_us, jpeg = frame.index, frame.pts_us, frame.jpeg
            assert pts_us == index * 40_000
            frames[index] = jpeg


def whole_audio_frames(server: ServerProcess, audio: bytes, frames: int) -> list[bytes]:
    """The frames InferBatchComposite computes from the whole (flush-padded) audio at once."""
    samples = np.frombuffer(audio, "<i2").astype(np.float32) / 32768.0
    whole = np.zeros((frames + 15) * 640, np.float32)
    whole[:len(samples)] = samples
    with channel(server.address) as ch:
        resp = pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(pb.CompositeBatchRequest(
            model_id="demo", raw_audio=whole.tobytes(), batch_size=frames), timeout=60)
    assert resp.success, resp.error
    return list(resp.composited_frames)


def http_status(server: ServerProcess, path: str) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{server.ws_port}{path}").status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_plain_http_gets_400_on_audio_and_404_elsewhere(server) -> None:
    """GET /audio without an upgrade is 400; GET / is 404."""
    assert http_status(server, "/audio") == 400
    assert http_status(server, "/") == 404


def test_streamed_frames_equal_the_whole_audio_at_once(server) -> None:
    """1.1 s streamed in 40 ms chunks: 28 frames, byte-identical to the whole-audio request."""
    audio = pcm16(1.1)

    async def run() -> tuple[dict[int, bytes], list[dict]]:
        async with connect(url(server), additional_headers={"X-Client-ID": "equal"}) as ws:
            ready = json.loads(await ws.recv())
            assert ready == {"type": "ready", "client_id": "equal", "model": "demo", "fps": 25,
                             "sample_rate": 16000, "format": "s16le"}
            return await stream(ws, audio)

    frames, statuses = asyncio.run(run())
    assert statuses[-1] == {"type": "flushed", "frames": 28}
    assert sorted(frames) == list(range(28))
    assert [frames[i] for i in range(28)] == whole_audio_frames(server, audio, 28)


@pytest.mark.parametrize("seconds", [0.04, 0.5, 1.0, 2.3])
def test_n_seconds_give_ceil_25n_frames(server, seconds: float) -> None:
    """N seconds of audio give ceil(25 N) frames, numbered 0.. in order."""
    async def run() -> dict[int, bytes]:
        async with connect(url(server)) as ws:
            await ws.recv()
            return (await stream(ws, pcm16(seconds), chunk=3000))[0]

    frames = asyncio.run(run())
    assert sorted(frames) == list(range(math.ceil(round(25 * seconds, 6))))


def test_float_audio_at_48k_is_converted(server) -> None:
    """format=f32le&rate=48000: resampled to the 16 kHz clock, ceil(25 N) frames."""
    audio = speech_like_audio(0.8, sample_rate=48000).astype("<f4").tobytes()

    async def run() -> dict[int, bytes]:
        async with connect(url(server, "?format=f32le&rate=48000")) as ws:
            ready = json.loads(await ws.recv())
            assert (ready["format"], ready["sample_rate"]) == ("f32le", 48000)
            return (await stream(ws, audio, chunk=4000))[0]

    assert sorted(asyncio.run(run())) == list(range(20))


def test_cancel_drops_queued_work_and_restarts_the_clock(server) -> None:
    """cancel: 'cancelled', no frame of the dropped audio afterwards, new audio from frame 0."""
    async def run() -> tuple[dict, dict[int, bytes], list[dict]]:
        async with connect(url(server)) as ws:
            await ws.recv()
            await ws.send(pcm16(0.3))  # not enough for any frame yet (look-ahead)
            await ws.send(json.dumps({"type": "cancel"}))
            while isinstance(message := await ws.recv(), bytes):
                pass
            cancelled = json.loads(message)
            frames, statuses = await stream(ws, pcm16(0.4, seed=3), chunk=2000)
            return cancelled, frames, statuses

    cancelled, frames, statuses = asyncio.run(run())
    assert cancelled["type"] == "cancelled" and cancelled["dropped_frames"] == 8
    assert sorted(frames) == list(range(10))
    assert statuses[-1] == {"type": "flushed", "frames": 10}


def test_handshake_refusals(server) -> None:
    """Foreign browser Origin 403, unknown model 404, bad format 400; localhost Origin ok."""
    async def status(**kwargs) -> int | None:
        try:
            async with connect(**kwargs) as ws:
                await ws.recv()
                return None
        except InvalidStatus as exc:
            return exc.response.status_code

    async def run() -> list[int | None]:
        return [await status(uri=url(server), origin="https://evil.example"),
                await status(uri=url(server), origin="http://localhost:3000"),
                await status(uri=url(server, "?model=nobody")),
                await status(uri=url(server), additional_headers={"X-Model-ID": "nobody"}),
                await status(uri=url(server, "?format=mp3")),
                await status(uri=url(server, "?rate=100"))]

    assert asyncio.run(run()) == [403, None, 404, 404, 400, 400]


def test_max_clients_refuses_the_next_handshake(server) -> None:
    """With MAX_CLIENTS=3, a fourth concurrent connection is refused (503)."""
    async def run() -> int:
        open_ = [await connect(url(server)) for _ in range(MAX_CLIENTS)]
        try:
            for ws in open_:
                await ws.recv()
            with pytest.raises(InvalidStatus) as info:
                await connect(url(server))
            return info.value.response.status_code
        finally:
            for ws in open_:
                await ws.close()

    assert asyncio.run(run()) == 503


def test_oversized_message_and_rate_limit_close_the_session(server) -> None:
    """A message over max_message_bytes closes with 1009; a flood over the rate limit, 1008."""
    async def run() -> tuple[int, int, list[str]]:
        async with connect(url(server)) as ws:
            await ws.recv()
            await ws.send(b"\0" * 70000)
            with pytest.raises(ConnectionClosed) as big:
                while True:
                    await ws.recv()
        texts = []
        async with connect(url(server)) as ws:
            await ws.recv()
            with pytest.raises(ConnectionClosed) as flood:
                for _ in range(1000):
                    await ws.send(b"\0\0" * 10)
                while True:
                    message = await ws.recv()
                    if isinstance(message, str):
                        texts.append(message)
        return big.value.rcvd.code, flood.value.rcvd.code, texts

    big, flood, texts = asyncio.run(run())
    assert big == 1009
    assert flood == 1008 and any("rate limit" in t for t in texts)


def test_grpc_stream_and_process_audio_give_the_websocket_frames(server) -> None:
    """StreamAudio and ProcessAudio return the same JPEGs as the whole-audio request."""
    audio = pcm16(0.9, seed=5)
    expected = whole_audio_frames(server, audio, 23)

    def requests():
        yield pb.StreamAudioRequest(config=pb.StreamConfig(model_id="demo", client_id="g"))
        for i in range(0, len(audio), 1000):
            yield pb.StreamAudioRequest(audio=audio[i:i + 1000])

    with channel(server.address) as ch:
        streamed, statuses = {}, []
        for r in pb_grpc.MonolithicServiceStub(ch).StreamAudio(requests(), timeout=60):
            if r.WhichOneof("message") == "frame":
                assert r.frame.pts_us == r.frame.frame_index * 40_000
                streamed[r.frame.frame_index] = r.frame.jpeg
            else:
                statuses.append(json.loads(r.status_json))
        assert [s["type"] for s in statuses] == ["ready", "flushed"]
        assert [streamed[i] for i in range(23)] == expected

        inference = ipb_grpc.InferenceServiceStub(ch)
        chunks = [audio[i:i + 333] for i in range(0, len(audio), 333)]  # odd sizes: carried
        resp = inference.ProcessAudio(ipb.AudioRequest(client_id="p", audio_chunks=chunks),
                                      timeout=60)
        assert resp.status_code == 200 and list(resp.frames) == expected
        summary = json.loads(resp.result)
        assert (summary["frames"], summary["chunks"], summary["client_id"]) == (23, len(chunks), "p")
        empty = inference.ProcessAudio(ipb.AudioRequest(client_id="e"), timeout=10)
        assert (empty.status_code, empty.message) == (400, "audio_chunks is empty")


def test_seed_log_lines(server) -> None:
    """The connect, batch and disconnect lines of the seed appear in the log."""
    async def run() -> None:
        async with connect(url(server), additional_headers={"X-Client-ID": "logged"}) as ws:
            await ws.recv()
            await stream(ws, pcm16(0.2))

    asyncio.run(run())
    lines = ("client logged connected", "batch ready: client=logged, chunks=",
             "batch sent to inference server: client=logged, chunks=",
             "client logged disconnected")
    deadline = time.monotonic() + 5  # the server logs the disconnect after our close
    while not all(line in server.log_path.read_text() for line in lines):
        log = server.log_path.read_text()
        assert time.monotonic() < deadline, [line for line in lines if line not in log]
        time.sleep(0.05)


def test_a_slow_consumer_is_closed_not_buffered(tmp_path: Path, small_models_root: Path) -> None:
    """A client that stops reading is disconnected after send_timeout_s, by the server and
    while the client still reads nothing; the server goes on."""
    import socket

    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{"streaming.send_timeout_s": 1})
    with ServerProcess(config, log_path=tmp_path / "server.log") as srv:
        async def run() -> None:
            sock = socket.create_connection(("127.0.0.1", srv.ws_port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            async with connect(url(srv), sock=sock, max_size=None, close_timeout=0.5,
                               additional_headers={"X-Client-ID": "slow"}) as ws:
                await ws.recv()
                await ws.send(pcm16(6.0))  # 150 frames, ~5 MB of JPEG
                await ws.send(json.dumps({"type": "flush"}))
                # not reading: the server must give up on us and end the session itself
                deadline = time.monotonic() + 30
                while "client slow disconnected" not in srv.log_path.read_text():
                    assert time.monotonic() < deadline, "the server kept the session"
                    await asyncio.sleep(0.2)
                ws.transport.abort()

        asyncio.run(run())
        assert "client=slow: client did not take a message for 1 s" in srv.log_path.read_text()
        with channel(srv.address) as ch:  # and everyone else is still served
            assert pb_grpc.MonolithicServiceStub(ch).Health(pb.HealthRequest(), timeout=5).healthy
