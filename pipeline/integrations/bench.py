"""Figures of the Pipecat video service in a real Pipecat pipeline against a server:

    python -m pipeline.integrations.bench [--server ws://host:port] [--utterances N] [--json]

Without --server it starts `lipsync serve` (config.yaml, free ports) for the run. It says N
utterances (2 s of speech-like audio at 24 kHz, sent at once as a TTS does, one every 4.5 s);
every second one is interrupted 1 s after it was sent. Reported:

- first speech frame: from the utterance's first TTS audio entering the service to the first
  speech frame leaving it (p50 / p99 over the utterances; one with no speech frame before the
  next is counted apart), and to its first audio leaving it (lips or not: playback starts);
- interrupt: from the InterruptionFrame to the last speech frame or audio leaving the service
  after it (0 when none did), and to the server's confirmation;
- CPU of this process (the agent's: Pipecat, the service, its JPEG decoding) per session, while
  idle and while speaking; the frames' rate and gaps as they leave the service, and how long
  the service held each (from its message's arrival: the JPEG decode and the event loop);
- the client side of a raw-pixel output instead of JPEG (`--raw-compare`): a local WebSocket
  sender in another process sends the same frames at 25 fps as JPEG, as raw RGB and as raw
  I420, twice each, alternated; the receiving process's CPU per frame for each, the frame made
  RGB as the Pipecat service needs it (JPEG decoded, RGB copied, I420 converted).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

FRAME_S = 0.04
TTS_RATE = 24000


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def pipecat_run(url: str, utterances: int) -> dict:
    from pipecat.frames.frames import (
        EndFrame,
        Frame,
        InterruptionFrame,
        OutputImageRawFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.workers.runner import WorkerRunner

    from pipeline.client import speech_like_audio
    from pipeline.integrations.pipecat import LipsyncVideoService

    out: list[tuple[float, Frame]] = []
    jpeg_sizes: list[tuple[int, int]] = []

    class Sink(FrameProcessor):
        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if direction == FrameDirection.DOWNSTREAM:
                out.append((time.monotonic(), frame))
            await self.push_frame(frame, direction)

    service = LipsyncVideoService(url=url)
    worker = PipelineWorker(Pipeline([service, Sink()]), cancel_on_idle_timeout=False)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_w: object, _f: object) -> None:
        started.set()

    marks: dict[str, list[float]] = {"speak": [], "interrupt": []}
    phases: dict[str, list[tuple[float, float, float, float]]] = {"idle": [], "speaking": []}

    async def conversation() -> None:
        await asyncio.wait_for(started.wait(), 30)
        await asyncio.sleep(2.0)
        t0, c0 = time.monotonic(), _cpu()
        await asyncio.sleep(4.0)
        phases["idle"].append((t0, time.monotonic(), c0, _cpu()))
        for i in range(utterances):
            audio = speech_like_audio(2.0, sample_rate=TTS_RATE, seed=10 + i)
            pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
            step = TTS_RATE // 50
            t0, c0 = time.monotonic(), _cpu()
            marks["speak"].append(t0)
            for j in range(0, len(pcm), step):
                await worker.queue_frame(TTSAudioRawFrame(audio=pcm[j:j + step].tobytes(),
                                                          sample_rate=TTS_RATE, num_channels=1))
            await worker.queue_frame(TTSStoppedFrame())
            if i % 2:
                await asyncio.sleep(1.0)
                marks["interrupt"].append(time.monotonic())
                await worker.queue_frame(InterruptionFrame())
                await asyncio.sleep(3.5)
            else:
                await asyncio.sleep(3.0)
                phases["speaking"].append((t0, time.monotonic(), c0, _cpu()))
                await asyncio.sleep(1.5)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), conversation())

    images = [(t, f) for t, f in out if isinstance(f, OutputImageRawFrame)]
    speech_images = [t for t, f in images if f.metadata.get("lipsync", {}).get("speech")]
    audio_out = [t for t, f in out if isinstance(f, TTSAudioRawFrame)]
    latency, audio_latency, no_speech = [], [], 0
    for i, t in enumerate(marks["speak"]):
        end = marks["speak"][i + 1] if i + 1 < len(marks["speak"]) else float("inf")
        first = [s for s in speech_images if t < s < end]
        heard = [s for s in audio_out if t < s < end]
        if first:
            latency.append(first[0] - t)
        else:
            no_speech += 1
        if heard:
            audio_latency.append(heard[0] - t)
    interrupt = []
    for t in marks["interrupt"]:
        later = [s for s in speech_images if s > t] + \
                [s for s, f in out if isinstance(f, TTSAudioRawFrame) and s > t]
        nxt = [s for s in marks["speak"] if s > t]
        later = [s for s in later if not nxt or s < nxt[0]]
        interrupt.append(max(later) - t if later else 0.0)
    if images:
        width, height = images[0][1].size
        jpeg_sizes.append((width, height))

    def share(phase: list[tuple[float, float, float, float]]) -> float:
        wall = sum(b - a for a, b, _, _ in phase)
        return sum(d - c for _, _, c, d in phase) / wall * 100 if wall else float("nan")

    times = [t for t, _ in images]
    gaps = np.diff(times) if len(times) > 1 else np.zeros(1)
    held = [(t - f.metadata["lipsync"]["received"]) * 1000 for t, f in images
            if f.metadata.get("lipsync", {}).get("received")]
    return {
        "utterances": utterances,
        "first_speech_frame_ms": {"p50": _pct(latency, 50) * 1000, "p99": _pct(latency, 99) * 1000,
                                  "n": len(latency), "utterances_without": no_speech},
        "first_audio_out_ms": {"p50": _pct(audio_latency, 50) * 1000,
                               "p99": _pct(audio_latency, 99) * 1000},
        "interrupt_last_speech_ms": {"max": max(interrupt, default=0.0) * 1000, "n": len(interrupt)},
        "interrupt_confirmed_ms": {"p50": _pct(service.record.interrupt_acks, 50) * 1000,
                                   "p99": _pct(service.record.interrupt_acks, 99) * 1000},
        "agent_cpu_pct": {"idle": share(phases["idle"]), "speaking": share(phases["speaking"])},
        "frames": len(images), "fps": len(images) / (times[-1] - times[0]) if len(times) > 1 else 0,
        "gap_ms": {"p99": float(np.percentile(gaps, 99)) * 1000, "max": float(gaps.max()) * 1000},
        # from a frame's message arriving to the frame leaving the service (its decode included)
        "held_in_service_ms": {"p50": _pct(held, 50), "p99": _pct(held, 99),
                               "max": max(held, default=float("nan"))},
        "frame_size": jpeg_sizes[0] if jpeg_sizes else None,
    }


def _sender(port: int, kinds: dict[str, list[bytes]], seconds: float, ready) -> None:
    """Another process: serves `seconds` of frames at 25 fps to each client, of the kind its
    path names (/jpeg, /rgb, /i420)."""
    from websockets.sync.server import serve

    def handler(ws) -> None:
        frames = kinds[ws.request.path.strip("/")]
        start = time.monotonic()
        n = 0
        while n * FRAME_S < seconds:
            ws.send(frames[n % len(frames)])
            n += 1
            time.sleep(max(0.0, start + n * FRAME_S - time.monotonic()))

    with serve(handler, "127.0.0.1", port, max_size=None) as server:
        ready.set()
        server.serve_forever()


async def _receive(url: str, kind: str, shape: tuple[int, ...]) -> tuple[int, float]:
    import cv2
    from websockets.asyncio.client import connect

    from pipeline.integrations.live import FrameDecoder

    height, width = shape[:2]
    def copied(message: bytes) -> np.ndarray:
        return np.frombuffer(message, np.uint8).reshape(shape).copy()

    def converted(message: bytes) -> np.ndarray:
        yuv = np.frombuffer(message, np.uint8).reshape(height * 3 // 2, width)
        return cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420)

    decoders: dict[str, Callable[[bytes], np.ndarray]] = \
        {"jpeg": FrameDecoder("RGB"), "rgb": copied, "i420": converted}
    to_rgb = decoders[kind]
    frames, c0 = 0, _cpu()
    async with connect(url, max_size=None) as ws:
        async for message in ws:
            assert isinstance(message, bytes)
            image = to_rgb(message)
            assert image.shape == shape
            frames += 1
    return frames, _cpu() - c0


def raw_compare(jpegs: list[bytes], seconds: float = 8.0) -> dict:
    """The receiving side's CPU per frame to get an RGB frame: JPEG (decoded), raw RGB (copied),
    raw I420 (converted), alternated."""
    import cv2

    from pipeline.bench.local_server import free_port
    from pipeline.integrations.live import FrameDecoder

    rgb = [FrameDecoder("RGB")(j) for j in jpegs]
    kinds = {"jpeg": jpegs, "rgb": [image.tobytes() for image in rgb],
             "i420": [cv2.cvtColor(image, cv2.COLOR_RGB2YUV_I420).tobytes() for image in rgb]}
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_sender, args=(port, kinds, seconds, ready), daemon=True)
    proc.start()
    try:
        ready.wait(30)
        result: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(2):
            for kind in kinds:
                frames, cpu = asyncio.run(_receive(f"ws://127.0.0.1:{port}/{kind}", kind,
                                                   rgb[0].shape))
                result[kind].append(cpu / frames * 1000)
    finally:
        proc.terminate()
        proc.join(10)
    return {"ms_per_frame": {kind: float(np.mean(v)) for kind, v in result.items()},
            "kb_per_frame": {kind: float(np.mean([len(f) for f in frames])) / 1024
                             for kind, frames in kinds.items()},
            "runs": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="a running server's WebSocket base (default: start one)")
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--utterances", type=int, default=10)
    parser.add_argument("--raw-compare", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with ExitStack() as stack:
        url = args.server
        if url is None:
            url = f"ws://127.0.0.1:{_own_server(stack, args.config).ws_port}"
        figures = asyncio.run(pipecat_run(url, args.utterances))
        jpegs = asyncio.run(_idle_jpegs(url, 50))
    figures["load_average_at_end"] = os.getloadavg()[0]
    figures["load_average_at_start"] = load_before
    if args.raw_compare:
        figures["raw_compare"] = raw_compare(jpegs)
    print(json.dumps(figures, indent=None if args.json else 2))


def _own_server(stack: ExitStack, config: Path):  # -> ServerProcess
    """`lipsync serve` of `config` for this run, its admission open (one measured session on a
    box whose frame budget other load may have lowered is not what is measured here)."""
    import tempfile

    import yaml

    from pipeline.bench.local_server import start_server

    raw = yaml.safe_load(config.read_text())
    raw.setdefault("streaming", {})["capacity_fps"] = 10_000
    raw.setdefault("ops", {})["metrics_port"] = 0                 # ports of its own only
    raw.setdefault("runtime", {})["instance"] = f"integrations{os.getpid()}"
    raw["models_root"] = str((config.parent / raw.get("models_root", "models")).resolve())
    path = Path(tempfile.mkdtemp(prefix="lipsync-integrations-")) / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return start_server(stack, path)


async def _idle_jpegs(url: str, count: int) -> list[bytes]:
    """The first `count` frames of a fresh live session (the avatar's own JPEGs)."""
    from websockets.asyncio.client import connect

    from pipeline.client import parse_frame_message
    from pipeline.integrations.live import live_url

    jpegs: list[bytes] = []
    async with connect(live_url(url, None), max_size=None) as ws:
        async for message in ws:
            if isinstance(message, bytes):
                jpegs.append(parse_frame_message(message).jpeg)
                if len(jpegs) == count:
                    break
    return jpegs


if __name__ == "__main__":
    main()
