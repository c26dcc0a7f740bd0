"""The browser demo (`GET /demo`): the page as served, and the page at work in headless
Chromium — its microphone a speech WAV, driven over the DevTools protocol — judged by its
own counters (window.demoStats)."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import time
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect

from pipeline.client import speech_like_audio
from pipeline.frontend.streaming.demo import demo_page

CHROMIUM = shutil.which("chromium")
SCREENSHOT_ENV = "LIPSYNC_DEMO_SCREENSHOT"  # where to keep the page's screenshot (docs/demo.png)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         "--autoplay-policy=no-user-gesture-required", "--window-size=860,800",
         # a page opened over DevTools is not throttled as a background tab would be
         "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
         "--disable-backgrounding-occluded-windows", "--remote-debugging-port=0")


@pytest.fixture(scope="module")
def server(start_server):
    # one session: admission is not the point here (other tests load the box meanwhile)
    return start_server(**{"streaming.capacity_fps": 10_000})


def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_demo_page_is_served_with_a_policy_that_admits_only_itself(server) -> None:
    """GET /demo: 200, the packaged page as UTF-8 HTML that loads nothing from elsewhere, and
    a CSP whose only script sources are the page's one inline script (by hash) and blob:
    (its worklet), connections to its own origin only; / stays 404, /audio without an
    upgrade 400."""
    status, headers, body = http_get(server.ws_port, "/demo")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    html = body.decode()
    assert html == demo_page().html
    assert not re.search(r"<[a-z][^>]*\s(src|href)\s*=|https?://", html)  # nothing external
    csp = dict(d.strip().split(" ", 1) for d in headers["content-security-policy"].split(";"))
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert csp["script-src"] == f"'sha256-{digest}' blob:"
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert http_get(server.ws_port, "/")[0] == 404
    assert http_get(server.ws_port, "/audio")[0] == 400


def speech_wav(path: Path) -> Path:
    """The fake microphone: 0.6 s of silence, then speech-like audio (16 kHz mono s16le)."""
    audio = np.concatenate([np.zeros(9600, np.float32), speech_like_audio(6.0, seed=7)])
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@contextmanager
def chromium(tmp: Path, wav: Path) -> Iterator[str]:
    """Headless Chromium, its microphone `wav`; yields its DevTools address (from stderr).
    It runs in its own process group, ended with it."""
    log = tmp / "chromium.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp / 'profile'}",
             f"--use-file-for-fake-audio-capture={wav}%noloop", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"DevTools listening on (ws://\S+)",
                                      log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        yield found.group(1)
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to Chromium's process group; SIGKILL to what is left of it after 10 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            proc.poll()  # reaps the leader, which would otherwise stay in the group
            os.killpg(proc.pid, 0)  # raises once every process of the group is gone
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class DevTools:
    """The DevTools protocol over one WebSocket, commands one at a time; the events that
    come between answers (console lines, exceptions) are kept for failure messages."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.last_id = 0
        self.events: list[str] = []

    async def call(self, method: str, session: str | None = None, **params: object) -> dict:
        self.last_id += 1
        message: dict[str, object] = {"id": self.last_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if reply.get("method") in ("Runtime.consoleAPICalled", "Runtime.exceptionThrown"):
                self.events.append(json.dumps(reply["params"])[:500])

    async def open(self, url: str) -> tuple[str, str]:
        """A new page at `url`: its target id and session id."""
        target = (await self.call("Target.createTarget", url="about:blank"))["targetId"]
        attached = await self.call("Target.attachToTarget", targetId=target, flatten=True)
        session = attached["sessionId"]
        await self.call("Runtime.enable", session)
        await self.call("Page.bringToFront", session)
        await self.call("Page.navigate", session, url=url)
        return target, session

    async def evaluate(self, session: str, expression: str) -> Any:  # a JSON value
        result = await self.call("Runtime.evaluate", session, expression=expression,
                                 returnByValue=True)
        return result["result"].get("value")

    async def stats_when(self, session: str, done: Callable[[dict], bool], timeout_s: float,
                         seen: list[dict] | None = None) -> dict:
        """window.demoStats, polled every 0.2 s until `done` says so (or the timeout: the last
        seen); every poll's answer is appended to `seen`."""
        stats: dict = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not done(stats):
            await asyncio.sleep(0.2)
            stats = dict(await self.evaluate(session, "window.demoStats ?? null") or {})
            if seen is not None:
                seen.append(stats)
        return stats


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Headless Chromium, its fake microphone a speech WAV: its DevTools address and the WAV."""
    if CHROMIUM is None:
        pytest.skip("chromium is not on PATH (Debian's package `chromium`; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("chromium")
    wav = speech_wav(tmp / "speech.wav")
    with chromium(tmp, wav) as devtools_url:
        yield devtools_url, wav


def in_sync(stats: dict) -> bool:
    """The A/V offset the page measured within one frame (40 ms): its median, and 95 % of the
    speech frames (a machine that stalls the page shows as a few outliers; the maximum is
    printed, not judged)."""
    return abs(stats["avOffsetMedianMs"]) <= 40 and stats["avOffsetP95Ms"] <= 40


def test_demo_draws_live_frames_in_sync_with_the_microphone(server, browser, tmp_path: Path) -> None:
    """The page on a fake microphone of speech, started by ?autostart=mic: it draws >= 100
    frames at about 25 fps, speech frames among them, with no error; the first voiced audio
    shows within 3 s, on the frame where the server's VAD puts its start (±1), and the A/V
    offset it measures (frame drawn − its audio heard) stays within one frame (40 ms)."""
    devtools_url, _ = browser
    url = f"http://127.0.0.1:{server.ws_port}/demo?autostart=mic"

    def settled(stats: dict) -> bool:
        return (stats.get("framesDrawn", 0) >= 100 and stats.get("avOffsetCount", 0) >= 25
                and stats.get("firstFrameLatencyMs") is not None)

    async def run() -> tuple[dict, bytes, list[str]]:
        async with connect(devtools_url, max_size=None) as ws:
            devtools = DevTools(ws)
            target, session = await devtools.open(url)
            stats = await devtools.stats_when(session, settled, timeout_s=20, seen=seen)
            shot = await devtools.call("Page.captureScreenshot", session, format="png")
            await devtools.call("Target.closeTarget", targetId=target)
            return stats, base64.b64decode(shot["data"]), devtools.events

    seen: list[dict] = []
    stats, png, console = asyncio.run(run())
    # the page's fps (frames drawn in the last second) once a second has been drawn: the median
    fps = sorted(s["fps"] for s in seen if s.get("framesDrawn", 0) >= 30)
    (tmp_path / "demo.png").write_bytes(png)
    if os.environ.get(SCREENSHOT_ENV):
        Path(os.environ[SCREENSHOT_ENV]).write_bytes(png)
    print("demoStats:", json.dumps(stats))
    context = f"{stats}\nconsole: {console}"
    assert png.startswith(b"\x89PNG")
    assert stats.get("errors") == 0 and stats["state"] == "live", context
    assert stats["framesDrawn"] >= 100 and stats["speechFramesDrawn"] >= 25, context
    assert fps and fps[len(fps) // 2] >= 20, (fps, context)
    assert 0 < stats["firstFrameLatencyMs"] < 3000, context
    assert abs(stats["vadSkewFrames"]) <= 1, context
    assert stats["avOffsetCount"] >= 25 and in_sync(stats), context


def test_demo_plays_a_wav_file_in_sync_and_interrupts(server, browser) -> None:
    """A WAV file chosen in the page is streamed and played in sync (A/V offset within 40 ms);
    Interrupt is answered once and stops the file: for the next 2 s only silence is sent
    (the speech used to resume a second later) while idle frames go on; the file chosen
    again anchors a new segment, in sync too."""
    devtools_url, wav = browser
    url = f"http://127.0.0.1:{server.ws_port}/demo"

    async def run() -> tuple[dict, dict, list[str]]:
        async with connect(devtools_url, max_size=None) as ws:
            devtools = DevTools(ws)
            target, session = await devtools.open(url)
            await devtools.stats_when(session, lambda s: s.get("state") == "idle", timeout_s=10)
            root = await devtools.call("DOM.getDocument", session)
            node = await devtools.call("DOM.querySelector", session, nodeId=root["root"]["nodeId"],
                                       selector="#file")
            await devtools.call("DOM.setFileInputFiles", session, files=[str(wav)],
                                nodeId=node["nodeId"])
            before = await devtools.stats_when(session, lambda s: s.get("avOffsetCount", 0) >= 25,
                                               timeout_s=15)
            await devtools.evaluate(session, "document.getElementById('interrupt').click()")
            interrupted = await devtools.stats_when(session, lambda s: s.get("interrupts") == 1,
                                                    timeout_s=5)
            await asyncio.sleep(0.3)  # chunks already in the capture's hands
            quiet_from = dict(await devtools.evaluate(session, "window.demoStats"))
            await asyncio.sleep(2.0)
            quiet_to = dict(await devtools.evaluate(session, "window.demoStats"))
            await devtools.call("DOM.setFileInputFiles", session, files=[str(wav)],
                                nodeId=node["nodeId"])
            measured, anchored = quiet_to["avOffsetCount"], quiet_to["anchors"]
            after = await devtools.stats_when(
                session, lambda s: s.get("anchors", 0) > anchored
                and s["avOffsetCount"] >= measured + 25, timeout_s=15)
            await devtools.call("Target.closeTarget", targetId=target)
            return before, (interrupted, quiet_from, quiet_to), after, devtools.events

    before, (interrupted, quiet_from, quiet_to), after, console = asyncio.run(run())
    print("demoStats before the interrupt:", json.dumps(before))
    print("demoStats after:", json.dumps(after))
    context = f"{before}\n{quiet_from}\n{quiet_to}\n{after}\nconsole: {console}"
    assert before.get("errors") == 0 and before["anchors"] == 1 and in_sync(before), context
    assert interrupted.get("interrupts") == 1, context
    assert quiet_to["audioVoicedMs"] == quiet_from["audioVoicedMs"], context  # the file stopped
    assert quiet_to["audioSentMs"] > quiet_from["audioSentMs"] + 1500, context  # silence goes on
    # so does the video: frames whose time came, drawn or (a page starved of CPU skips a
    # refresh now and then) passed over for a newer one
    played = [s["framesDrawn"] + s["framesSkipped"] for s in (quiet_from, quiet_to)]
    assert played[1] > played[0] + 40, context
    assert after["errors"] == 0 and after["interrupts"] == 2, context  # a new file: a new segment
    assert after["anchors"] == quiet_to["anchors"] + 1 and in_sync(after), context


def test_demo_shows_why_the_server_refused_the_session(server, start_server, browser) -> None:
    """A page whose session is refused says why, visibly: an unknown model (refused at the
    handshake, which a page sees only as 1006) and a box without room for a live session
    (the reason names what limits it and the setting that overrides it)."""
    devtools_url, _ = browser
    full = start_server(**{"streaming.capacity_fps": 10})

    async def refusal(port: int, query: str) -> tuple[str, str]:
        async with connect(devtools_url, max_size=None) as ws:
            devtools = DevTools(ws)
            target, session = await devtools.open(f"http://127.0.0.1:{port}/demo?{query}")
            stats = await devtools.stats_when(session, lambda s: s.get("errors", 0) >= 1,
                                              timeout_s=15)
            shown = await devtools.evaluate(session, "document.getElementById('status').textContent")
            await devtools.call("Target.closeTarget", targetId=target)
            return str(stats.get("lastError")), str(shown)

    error, shown = asyncio.run(refusal(server.ws_port, "autostart=mic&model=nosuch"))
    assert "model 'nosuch' is not configured" in error and "nosuch" in shown, (error, shown)
    error, shown = asyncio.run(refusal(full.ws_port, "autostart=mic"))
    assert "at capacity" in shown and "streaming.capacity_fps: 10" in shown, (error, shown)
