"""The soak: 10 minutes (LIPSYNC_SOAK_S) of 4 gRPC clients and 2 WebSocket clients whose
sessions open and close all the time, ending every way a session can end, beside 2 live
sessions that speak half the time all along. Asserts no error, nothing leaked (sessions,
arena blocks, tasks, shared-memory segments), flat memory in every process, and that the
live sessions showed at least 98 % of their speech frames under the batch load (live work
goes first); prints the figures (docs/benchmarks.md, "Soak").

Not in CI: `pytest -m soak`.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from websockets.asyncio.client import connect

from pipeline.bench import live_load
from pipeline.bench.local_server import ServerProcess
from pipeline.client import channel, speech_like_audio
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from pipeline.shm.segment import list_segments
from tests.conftest import ops_stats, write_config

pytestmark = pytest.mark.soak

SOAK_S = float(os.environ.get("LIPSYNC_SOAK_S", "600"))
SAMPLE_S = 15.0
MEMORY_SLACK_MB = 64.0  # growth allowed from the first quarter to the end, per process
LIVE_SESSIONS = 2
MIN_SPEECH_SHOWN = 0.98  # of the live sessions' speech frames, under the batch load


class Load:
    """Errors and counts shared by the client threads."""

    def __init__(self, until: float) -> None:
        self.until = until
        self.errors: list[str] = []
        self.requests = self.frames = self.sessions = 0
        self.latencies: list[float] = []
        self.lock = threading.Lock()

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)


def grpc_client(address: str, load: Load, seed: int) -> None:
    rng = random.Random(seed)
    with channel(address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        while time.monotonic() < load.until:
            batch = rng.choice((1, 2, 4, 8))
            model = rng.choice(("demo", "other"))
            request = pb.CompositeBatchRequest(
                model_id=model, batch_size=batch, start_frame_idx=rng.randrange(64),
                raw_audio=speech_like_audio((batch + 15) * 0.04, seed=seed).tobytes())
            if rng.random() < 0.25:  # a client-built visual input now and then
                request.visual_frames = np.full(batch * 6 * 320 * 320, 0.25, np.float32).tobytes()
            t0 = time.monotonic()
            try:
                resp = stub.InferBatchComposite(request, timeout=60)
            except Exception as exc:
                load.error(f"grpc {model} b{batch}: {exc}")
                continue
            if not resp.success or len(resp.composited_frames) != batch:
                load.error(f"grpc {model} b{batch}: {resp.error or len(resp.composited_frames)}")
                continue
            with load.lock:
                load.requests += 1
                load.frames += batch
                load.latencies.append(time.monotonic() - t0)


def pcm16(seconds: float, seed: int) -> bytes:
    return (np.clip(speech_like_audio(seconds, seed=seed), -1, 1) * 32767).astype("<i2").tobytes()


async def ws_session(url: str, rng: random.Random, load: Load) -> None:
    ending = rng.choice(("flush", "flush", "cancel", "close"))
    async with connect(url) as ws:
        await ws.recv()
        audio = pcm16(rng.uniform(0.5, 2.0), rng.randrange(1000))
        for i in range(0, len(audio), 3200):  # 100 ms messages, a little faster than real time
            await ws.send(audio[i:i + 3200])
            await asyncio.sleep(0.05)
        if ending == "close":
            return
        await ws.send(json.dumps({"type": ending}))
        expected = "flushed" if ending == "flush" else "cancelled"
        while True:
            message = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(message, bytes):
                with load.lock:
                    load.frames += 1
                continue
            status = json.loads(message)
            if status["type"] == "error":
                load.error(f"ws: {status}")
                return
            if status["type"] == expected:
                return


def ws_client(port: int, load: Load, seed: int) -> None:
    rng = random.Random(seed)

    async def run() -> None:
        while time.monotonic() < load.until:
            try:
                await ws_session(f"ws://127.0.0.1:{port}/audio", rng, load)
            except Exception as exc:
                load.error(f"ws: {type(exc).__name__}: {exc}")
            with load.lock:
                load.sessions += 1

    asyncio.run(run())


def live_client(port: int, load: Load, into: list[dict]) -> None:
    """LIVE_SESSIONS live sessions speaking half the time for the whole soak (the bench's
    live driver): their figures, errors as the load's."""
    seconds = max(1.0, load.until - time.monotonic() - live_load.TAIL_S - 1.0)
    logs = asyncio.run(live_load.drive_live(f"ws://127.0.0.1:{port}/audio?mode=live",
                                            LIVE_SESSIONS, seconds, 0.5))
    result = live_load.aggregate(logs)
    into.append(result)
    for session in result["per_session"]:
        for error in session["errors"] + ([session["refused"]] if session["refused"] else []):
            load.error(f"live {session['session']}: {error}")


def memory(config: Path) -> dict[str, float]:
    """Private resident memory of every process, in MB."""
    stats = ops_stats(config)
    procs = {"frontend": stats["frontend"]}
    procs.update({f"gpu_worker {w['index']}": w for w in stats["gpu_workers"]})
    procs.update({f"compositor {c['index']}": c for c in stats["compositors"]})
    return {name: p.get("private_bytes", 0) / 2**20 for name, p in procs.items()}


def test_soak(tmp_path: Path, small_models_root: Path) -> None:
    """SOAK_S of mixed gRPC and WebSocket traffic: no error, no leak, flat memory."""
    other = {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
             "crop_rects_path": "demo/crop_rects.json", "num_frames": 32}
    config = write_config(tmp_path / "config.yaml", small_models_root,
                          **{"models.other": other, "streaming.max_clients": 16,
                             "streaming.capacity_fps": 100})
    instance = yaml.safe_load(config.read_text())["runtime"]["instance"]
    with ServerProcess(config, log_path=tmp_path / "server.log") as srv:
        segments_before = len(list_segments(instance))
        tasks_before = ops_stats(config)["frontend"]["tasks"]
        load = Load(time.monotonic() + SOAK_S)
        threads = [threading.Thread(target=grpc_client, args=(srv.address, load, i))
                   for i in range(4)]
        threads += [threading.Thread(target=ws_client, args=(srv.ws_port, load, 100 + i))
                    for i in range(2)]
        live: list[dict] = []
        threads.append(threading.Thread(target=live_client, args=(srv.ws_port, load, live)))
        for t in threads:
            t.start()
        samples: list[tuple[float, dict[str, float]]] = []
        t0 = time.monotonic()
        while any(t.is_alive() for t in threads):
            samples.append((time.monotonic() - t0, memory(config)))
            time.sleep(SAMPLE_S)
        for t in threads:
            t.join()
        time.sleep(3)  # the last sessions' tasks end, the frontend trims after idling
        stats = ops_stats(config)
        samples.append((time.monotonic() - t0, memory(config)))
        segments_after = len(list_segments(instance))
        loaded = sum(m["state"] == "ready" for m in stats["models"].values())
    quarter = next(m for at, m in samples if at >= SOAK_S / 4)
    end = samples[-1][1]
    growth = {name: round(end[name] - quarter[name], 1) for name in end}
    latencies = sorted(load.latencies)
    (speech,) = live
    shown = speech["speech_frames"] / max(1, speech["speech_frames"] + speech["missed_speech"])
    figures = {
        "seconds": SOAK_S, "grpc_requests": load.requests, "ws_sessions": load.sessions,
        "frames": load.frames, "errors": len(load.errors),
        "grpc_p50_ms": round(1e3 * latencies[len(latencies) // 2], 1) if latencies else None,
        "grpc_p99_ms": round(1e3 * latencies[int(len(latencies) * 0.99)], 1) if latencies else None,
        "private_mb_at_quarter": {k: round(v, 1) for k, v in quarter.items()},
        "private_mb_at_end": {k: round(v, 1) for k, v in end.items()},
        "growth_mb": growth, "websocket_sessions_left": stats["frontend"]["websocket_sessions"],
        "arena_blocks_left": stats["arena"]["blocks"],
        "tasks": [tasks_before, stats["frontend"]["tasks"]],
        "segments": [segments_before, segments_after], "models_loaded": loaded,
        "loop_lag_max_ms": stats["frontend"]["loop_lag_max_ms"],
        "live_sessions": LIVE_SESSIONS, "live_speech_frames": speech["speech_frames"],
        "live_speech_missed": speech["missed_speech"], "live_speech_shown": round(shown, 4),
        "live_min_fps": speech["min_fps"],
    }
    print("SOAK " + json.dumps(figures))
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=2))
    assert load.errors == [], load.errors[:10]
    assert load.requests > 0 and load.sessions > 0
    assert stats["frontend"]["websocket_sessions"] == 0
    assert stats["arena"]["blocks"] == 0
    assert stats["frontend"]["tasks"] <= tasks_before
    assert segments_before == 2  # the request arena and the preloaded model's backgrounds
    assert segments_after == 1 + loaded  # the arena and one per model loaded, nothing else
    assert all(g <= MEMORY_SLACK_MB for g in growth.values()), growth
    assert shown >= MIN_SPEECH_SHOWN, figures
