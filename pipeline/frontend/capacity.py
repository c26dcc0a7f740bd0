"""How many speech frames per second this box can render, and how many it renders now: the
admission of live sessions (a new one needs 25 frames/s of headroom) and the figures an
operator sees (`lipsync stats`, `/metrics`).

What is in use is the speech the box renders: the frames of the last WINDOW_S, plus 25
frames/s for each utterance that began in the last RESERVE_S (its frames are not all in the
window yet). A silent live session shows idle frames, encoded once per model, and renders
nothing while silent. A new live session is refused when the speech under way leaves no room
for 25 more frames/s, or when the open live sessions, each expected to speak
streaming.live_speech_share of the time, would together need more than the budget: sessions
that connect while all are silent would otherwise all fall behind once they speak. (0: only
the speech under way counts, for boxes of mostly silent sessions.) A box whose sessions speak
more than expected falls below real time, which each session is told of (`below_real_time`,
streaming.low_fps_grace_s) and, with streaming.close_below_real_time, closed for.

The budget is measured while the server runs: the CPU seconds every role spends per frame
rendered (sampled each second from the processes' own CPU counters, over intervals with
enough frames to mean something), or before that the compute time of each request's stages
per frame; on CUDA workers also the UNet's time per frame on the device. The cores it
divides are what the rest of the box leaves: the CPU the box spends beyond the roles (other
services, a load generator on the same machine) is sampled too and not counted as the
server's.
`streaming.capacity_fps` overrides the measurement.
"""
from __future__ import annotations

import os
import time
import weakref
from collections import deque

from pipeline.config import Config
from pipeline.frontend.inflight import InferResult
from pipeline.synctalk import VIDEO_FPS

USABLE = 0.85            # of the cores (and devices): what is left for the rest of the box
WINDOW_S = 2.0           # frames/s in use: over this window
RESERVE_S = 3.0          # an utterance begun counts 25 frames/s this long, before its
                         # frames show in what is measured
MIN_SAMPLE_FRAMES = 25   # a CPU sample of fewer frames says more about idling than rendering
EWMA = 0.3


class FrameBudget:
    def __init__(self, cfg: Config) -> None:
        self.fixed = cfg.streaming.capacity_fps
        self.speech_share = cfg.streaming.live_speech_share
        self._live: weakref.WeakSet[object] = weakref.WeakSet()  # open live sessions
        self.cores = os.cpu_count() or 1
        self.devices = cfg.gpus.count
        self.cuda = False                      # set from the workers' heartbeats
        self.cpu_s_per_frame: float | None = None
        self.stage_s_per_frame: float | None = None
        self.unet_s_per_frame: float | None = None
        self._rendered: deque[tuple[float, int]] = deque()
        self._reserved: deque[float] = deque()  # utterances begun, not measured yet
        self.refused = 0
        self._last_sample: tuple[float, int] | None = None
        self._last_box: tuple[float, float, float] | None = None  # (time, roles, box) CPU s
        self.other_cores: float | None = None  # busy cores of the box beyond the roles
        self.frames = 0

    # ---- what is measured ------------------------------------------------------------

    def observe(self, result: InferResult) -> None:
        """A request rendered `len(result.frames)` frames at these stage costs."""
        frames = len(result.frames)
        if not frames:
            return
        done = result.done
        unet = done.inference_ns / max(1, done.run_frames or frames)
        stages = (done.audio_ns + done.visual_ns + result.paste_ns + result.jpeg_ns) / frames
        self.stage_s_per_frame = _ewma(self.stage_s_per_frame, (stages + unet) / 1e9)
        self.unet_s_per_frame = _ewma(self.unet_s_per_frame, unet / 1e9)
        self.frames += frames
        self._rendered.append((time.monotonic(), frames))

    def sample_cpu(self, cpu_seconds: float, box_cpu_seconds: float,
                   now: float | None = None) -> None:
        """The roles' CPU seconds so far (all processes) and the whole box's busy CPU
        seconds, once a second."""
        at = time.monotonic() if now is None else now
        if self._last_box is not None and at > self._last_box[0]:
            t, roles, box = self._last_box
            others = ((box_cpu_seconds - box) - (cpu_seconds - roles)) / (at - t)
            self.other_cores = max(0.0, _ewma(self.other_cores, others))
        self._last_box = (at, cpu_seconds, box_cpu_seconds)
        self._sample_frames(cpu_seconds)

    def _sample_frames(self, cpu_seconds: float) -> None:
        now = (cpu_seconds, self.frames)
        if self._last_sample is not None:
            cpu = now[0] - self._last_sample[0]
            frames = now[1] - self._last_sample[1]
            if frames < MIN_SAMPLE_FRAMES:
                if frames == 0:
                    self._last_sample = now  # idle: start the next interval afresh
                return
            self.cpu_s_per_frame = _ewma(self.cpu_s_per_frame, cpu / frames)
        self._last_sample = now

    # ---- what it means ---------------------------------------------------------------

    def budget_fps(self) -> float:
        """Speech frames per second the box sustains (inf until anything was measured)."""
        if self.fixed:
            return self.fixed
        per_frame = self.cpu_s_per_frame or self.stage_s_per_frame
        if per_frame is None or per_frame <= 0:
            return float("inf")
        budget = USABLE * max(0.0, self.cores - (self.other_cores or 0.0)) / per_frame
        if self.cuda and self.unet_s_per_frame:
            budget = min(budget, USABLE * self.devices / self.unet_s_per_frame)
        return budget

    def used_fps(self) -> float:
        """Frames rendered per second lately, plus 25 for each utterance begun in the last
        RESERVE_S (not all measured yet)."""
        now = time.monotonic()
        while self._rendered and self._rendered[0][0] < now - WINDOW_S:
            self._rendered.popleft()
        while self._reserved and self._reserved[0] < now - RESERVE_S:
            self._reserved.popleft()
        rendered = sum(f for _, f in self._rendered) / WINDOW_S
        return rendered + VIDEO_FPS * len(self._reserved)

    def expected_fps(self, sessions: int) -> float:
        """Speech frames/s that `sessions` live sessions are expected to need."""
        return sessions * self.speech_share * VIDEO_FPS

    def admit_live(self) -> str | None:
        """None when a new live session fits: 25 frames/s are free for it now, and every
        open live session's expected speech with its own fits; else why not."""
        budget, used, live = self.budget_fps(), self.used_fps(), len(self._live)
        if used + VIDEO_FPS > budget:
            self.refused += 1
            return (f"server at capacity: {used:.0f} of {budget:.0f} frames/s in use, a live "
                    f"session needs {VIDEO_FPS}")
        if self.expected_fps(live + 1) > budget:
            self.refused += 1
            return (f"server at capacity: {live} live sessions expected to speak "
                    f"{self.expected_fps(1):g} frames/s each, of {budget:.0f}")
        return None

    def opened(self, session: object) -> None:
        """A live session was admitted; its expected speech counts until closed (or gone)."""
        self._live.add(session)

    def closed(self, session: object) -> None:
        self._live.discard(session)

    def speaking(self) -> None:
        """A live session began an utterance: count it before its frames are measured."""
        self._reserved.append(time.monotonic())

    def snapshot(self) -> dict[str, float | int | None]:
        budget = self.budget_fps()
        return {"budget_fps": None if budget == float("inf") else round(budget, 1),
                "used_fps": round(self.used_fps(), 1), "refused": self.refused,
                "live_sessions": len(self._live),
                "expected_fps": round(self.expected_fps(len(self._live)), 1),
                "other_cores": round(self.other_cores or 0.0, 2),
                "cpu_ms_per_frame": _ms(self.cpu_s_per_frame),
                "stage_ms_per_frame": _ms(self.stage_s_per_frame),
                "unet_ms_per_frame": _ms(self.unet_s_per_frame)}


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
