"""SIGTERM while clients stream and render: every stream gets a clean end, every role
stops within the grace period without being killed, nothing is logged as a crash, and
`lipsync render` says the server shut down and leaves no file behind."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipeline.bench.local_server import ServerProcess
from pipeline.client import channel, speech_like_audio
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.conftest import write_config

GRACE_S = 3.0


def _pcm16(seconds: float) -> bytes:
    return (np.clip(speech_like_audio(seconds), -1, 1) * 32767).astype("<i2").tobytes()


class WebSocketStreamer(threading.Thread):
    """Streams audio in real time until the server closes; keeps the close code."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.frames = 0
        self.close_code: int | None = None

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        async with connect(f"ws://127.0.0.1:{self.port}/audio") as ws:
            await ws.recv()

            async def send() -> None:
                chunk = _pcm16(0.2)
                while True:
                    await ws.send(chunk)
                    await asyncio.sleep(0.2)

            sender = asyncio.create_task(send())
            try:
                while True:
                    if isinstance(await ws.recv(), bytes):
                        self.frames += 1
            except ConnectionClosed as exc:
                self.close_code = exc.rcvd.code if exc.rcvd is not None else None
            finally:
                sender.cancel()


class GrpcStreamer(threading.Thread):
    """StreamAudio in real time until the server ends the call; keeps its status."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.frames = 0
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.stop = threading.Event()

    def _requests(self):
        yield pb.StreamAudioRequest(config=pb.StreamConfig(model_id="demo"))
        chunk = _pcm16(0.2)
        while not self.stop.wait(0.2):
            yield pb.StreamAudioRequest(audio=chunk)

    def run(self) -> None:
        with channel(self.address) as ch:
            try:
                for r in pb_grpc.MonolithicServiceStub(ch).StreamAudio(self._requests()):
                    if r.WhichOneof("message") == "frame":
                        self.frames += 1
            except grpc.RpcError as exc:
                self.code, self.details = exc.code(), exc.details()
            finally:
                self.stop.set()


def test_sigterm_during_streams_and_renders_ends_each_cleanly(tmp_path: Path,
                                                              small_models_root: Path) -> None:
    """WebSocket close 1001, StreamAudio UNAVAILABLE "server shutting down", render exits 2
    saying the server shut down with no output file; exit 0 within the grace period, no
    role killed, no traceback."""
    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{"server.shutdown_grace_s": GRACE_S})
    wav = tmp_path / "long.wav"
    sf.write(wav, speech_like_audio(40.0), 16000)
    out = tmp_path / "out.mp4"
    srv = ServerProcess(config, log_path=tmp_path / "server.log")
    srv.start()
    try:
        ws, rpc = WebSocketStreamer(srv.ws_port), GrpcStreamer(srv.address)
        ws.start()
        rpc.start()
        render = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "render", "--wav", str(wav), "--out", str(out),
             "--address", srv.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while ws.frames == 0 or rpc.frames == 0:
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.1)
        time.sleep(1.0)  # the render is under way too
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(GRACE_S + 8)
        stopped_in = time.monotonic() - t0
        _, render_err = render.communicate(timeout=30)
        ws.join(10)
        rpc.join(10)
    finally:
        srv.stop()
    log = (tmp_path / "server.log").read_text()
    assert code == 0
    assert stopped_in < GRACE_S + 2, stopped_in
    assert ws.close_code == 1001
    assert (rpc.code, rpc.details) == (grpc.StatusCode.UNAVAILABLE, "server shutting down")
    assert render.returncode == 2  # a failed render (RenderError)
    assert "shut down" in render_err, render_err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".part" in p.name] == []
    assert "killing it" not in log
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:4000]


def test_a_clean_stop_logs_no_warning(tmp_path: Path, small_models_root: Path) -> None:
    """SIGTERM after some work: the roles stop in order and nothing is logged at WARNING or
    above (a compositor that stops with the rest is not a loss; that race is rare, and
    tests/unit/gpu_worker/test_credits.py pins its rule)."""
    from tests.e2e.load import Load
    from tests.helpers import FrameOracle

    config = write_config(tmp_path / "config.yaml", small_models_root)
    log_path = tmp_path / "server.log"
    with ServerProcess(config, log_path=log_path) as srv:
        with Load(srv.address, FrameOracle.of(small_models_root, 32), clients=2, batch=4) as load:
            time.sleep(1.0)
        assert load.outcomes and not load.problems()
        assert srv.stop() == 0
    loud = [line for line in log_path.read_text().splitlines()
            if " WARNING " in line or " ERROR " in line or " CRITICAL " in line]
    assert loud == [], loud
