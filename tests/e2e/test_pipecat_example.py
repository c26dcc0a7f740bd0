"""examples/pipecat_webrtc: the runnable Pipecat + SmallWebRTCTransport bot, opened in headless
Chromium (a fake microphone) against a real server: the page receives the avatar's video and
its voice over WebRTC."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from pipeline.bench.local_server import free_port
from tests.e2e.test_browser_demo import CHROMIUM, DevTools, chromium, speech_wav

BOT = Path(__file__).resolve().parents[2] / "examples" / "pipecat_webrtc" / "bot.py"


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(**{"streaming.capacity_fps": 10_000})


@pytest.fixture
def bot(server, tmp_path: Path):
    """The example's bot on a free port, saying its line every 3 s, its video at half the
    avatar's size (the WebRTC encoder of 1280x720 at 25 fps is more than this shared 2-core box
    spares next to a server and a browser); stopped after the test."""
    port = free_port()
    log = open(tmp_path / "bot.log", "wb")
    proc = subprocess.Popen([sys.executable, str(BOT), "--server", f"ws://127.0.0.1:{server.ws_port}",
                             "--port", str(port), "--every", "3", "--width", "640", "--height", "360"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "bot.log").read_text()[-3000:]) from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(15)
    log.close()
    print("bot log tail:", (tmp_path / "bot.log").read_text()[-1500:])


def test_the_page_receives_the_avatar_at_25_fps_and_its_voice(bot, tmp_path: Path) -> None:
    """Connect in the page: its inbound WebRTC video runs at >= 24 fps (median of its per-second
    samples once running) and its inbound audio carries sound (total audio energy > 0)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not on PATH (Debian's package `chromium`; .ci/run installs it)")
    seen: list[dict] = []

    async def run() -> tuple[dict, list[str]]:
        with chromium(tmp_path, speech_wav(tmp_path / "mic.wav")) as devtools_url:
            async with connect(devtools_url, max_size=None) as ws:
                devtools = DevTools(ws)
                target, session = await devtools.open(bot + "?autostart")
                stats: dict = {}
                deadline = time.monotonic() + 45
                while time.monotonic() < deadline and not (
                        stats.get("framesDecoded", 0) >= 150 and stats.get("audioEnergy", 0) > 0):
                    await asyncio.sleep(0.5)
                    stats = dict(await devtools.evaluate(session, "window.exampleStats ?? null") or {})
                    seen.append(stats)
                await devtools.call("Target.closeTarget", targetId=target)
                return stats, devtools.events

    stats, console = asyncio.run(run())
    fps = sorted(s["fps"] for s in seen if s.get("framesDecoded", 0) >= 50)
    print("exampleStats:", stats, "fps samples:", fps)
    context = f"{stats}\nconsole: {console}"
    assert stats.get("error") is None and stats["state"] == "connected", context
    assert stats["framesDecoded"] >= 150 and stats["audioEnergy"] > 0, context
    assert fps and fps[len(fps) // 2] >= 24, (fps, context)
