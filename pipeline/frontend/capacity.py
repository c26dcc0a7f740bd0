"""What the box can take, and who gets in: the frame budget (how many speech frames per second
this box renders, measured) and the admission of stream sessions (one act: a ticket).

**The budget** is the CPU seconds every role spends per frame rendered, sampled each second
from the processes' own counters by its own task (over intervals with enough frames to mean
something), seeded at each model load from the warm-up's stage costs, so it is known before
the first session; on CUDA workers also the UNet's time per frame on the device. The cores it
divides are what the rest of the box leaves: the CPU spent beyond the roles (other services,
a load generator on the same machine) is sampled too, smoothed over half a minute so a busy
moment does not swing it, and not counted as the server's. `streaming.capacity_fps` overrides
the measurement.

**Admission.** `Admission.admit()` checks and registers in one step and returns a `Ticket`
that is released on every ending (a context manager): a refused session holds nothing and a
granted one is never left uncounted. Every stream session needs one (WebSocket, StreamAudio,
ProcessAudio alike): at most `streaming.max_clients` open, `max_sessions_per_address` from one
address. A live session also needs room in the budget: 25 frames/s free now, and every open
live session's expected speech (`streaming.live_speech_share` of 25 frames/s each) within the
budget. What is in use is the live sessions' speech rendered in the last WINDOW_S (batch
work goes after live work: it takes what live sessions leave, and does not count), plus,
for each live session whose utterance has just begun, what its 25 frames/s exceed of its own frames measured
so far (its frames are not all in the window yet); one session reserves at most one utterance,
however often it is interrupted.
"""
from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

from pipeline.config import Config
from pipeline.frontend.inflight import InferResult
from pipeline.synctalk import VIDEO_FPS

USABLE = 0.85            # of the cores (and devices): what is left for the rest of the box
WINDOW_S = 2.0           # frames/s in use: over this window
RESERVE_S = 3.0          # an utterance begun counts 25 frames/s this long at most
MIN_SAMPLE_FRAMES = 25   # a CPU sample of fewer frames says more about idling than rendering
EWMA = 0.3               # of the per-frame costs, per sample
OTHERS_TAU_S = 30.0      # the rest of the box's CPU, smoothed over about this long
SAMPLE_S = 1.0
OVERRIDE = "streaming.capacity_fps"


class CapacityInputs(Protocol):
    """What the budget samples besides its own observations: the roles' processes and
    whether any worker runs on a GPU (the liveness view knows both)."""

    def role_pids(self) -> list[int]: ...

    def cuda(self) -> bool: ...


class FrameBudget:
    def __init__(self, cfg: Config) -> None:
        self.fixed = cfg.streaming.capacity_fps
        self.cores = os.cpu_count() or 1
        self.devices = cfg.gpus.count
        self.cuda = False
        self.cpu_s_per_frame: float | None = None
        self.stage_s_per_frame: float | None = None
        self.unet_s_per_frame: float | None = None
        self.other_cores: float | None = None  # busy cores of the box beyond the roles
        self.frames = 0
        self._rendered: deque[tuple[float, int]] = deque()
        self._last_sample: tuple[float, int] | None = None
        self._last_box: tuple[float, float, float] | None = None  # (time, roles, box) CPU s
        self._processes: dict[int, psutil.Process] = {}

    # ---- what is measured --------------------------------------------------------------

    def observe(self, result: InferResult, live: bool = False, warmup: bool = False) -> None:
        """A request rendered `len(result.frames)` frames at these stage costs. Every
        request measures the cost of a frame (a warm-up seeds it); only a live session's
        frames are speech in use: batch work yields to live work, so it leaves the budget
        to live sessions."""
        frames = len(result.frames)
        if not frames:
            return
        done = result.done
        unet = done.inference_ns / max(1, done.run_frames or frames)
        stages = (done.audio_ns + done.visual_ns + result.paste_ns + result.jpeg_ns) / frames
        self.stage_s_per_frame = _ewma(self.stage_s_per_frame, (stages + unet) / 1e9)
        self.unet_s_per_frame = _ewma(self.unet_s_per_frame, unet / 1e9)
        if not warmup:
            self.frames += frames
        if live:
            self._rendered.append((time.monotonic(), frames))

    def sample_cpu(self, cpu_seconds: float, box_cpu_seconds: float,
                   now: float | None = None) -> None:
        """The roles' CPU seconds so far (all processes) and the whole box's busy CPU
        seconds, about once a second."""
        at = time.monotonic() if now is None else now
        if self._last_box is not None and at > self._last_box[0]:
            t, roles, box = self._last_box
            others = max(0.0, ((box_cpu_seconds - box) - (cpu_seconds - roles)) / (at - t))
            weight = 1 - math.exp(-(at - t) / OTHERS_TAU_S)
            self.other_cores = others if self.other_cores is None else \
                (1 - weight) * self.other_cores + weight * others
        self._last_box = (at, cpu_seconds, box_cpu_seconds)
        now_frames = (cpu_seconds, self.frames)
        if self._last_sample is not None:
            cpu = now_frames[0] - self._last_sample[0]
            frames = now_frames[1] - self._last_sample[1]
            if frames < MIN_SAMPLE_FRAMES:
                if frames == 0:
                    self._last_sample = now_frames  # idle: start the next interval afresh
                return
            self.cpu_s_per_frame = _ewma(self.cpu_s_per_frame, cpu / frames)
        self._last_sample = now_frames

    async def sample_forever(self, inputs: CapacityInputs) -> None:
        """The budget's own task: the roles' and the box's CPU, once a second."""
        while True:
            self.cuda = inputs.cuda()
            self.sample_cpu(self._cpu_seconds(inputs.role_pids()), box_cpu_seconds())
            await asyncio.sleep(SAMPLE_S)

    def _cpu_seconds(self, pids: list[int]) -> float:
        total = 0.0
        for pid in {os.getpid(), *pids}:
            try:
                proc = self._processes.get(pid) or self._processes.setdefault(pid, psutil.Process(pid))
                cpu = proc.cpu_times()
                total += cpu.user + cpu.system
            except psutil.Error:
                self._processes.pop(pid, None)
        return total

    # ---- what it means -----------------------------------------------------------------

    def budget_fps(self) -> float:
        """Speech frames per second the box sustains (inf until anything was measured)."""
        if self.fixed:
            return self.fixed
        per_frame = self.cpu_s_per_frame or self.stage_s_per_frame
        if per_frame is None or per_frame <= 0:
            return float("inf")
        budget = USABLE * self.free_cores() / per_frame
        if self.cuda and self.unet_s_per_frame:
            budget = min(budget, USABLE * self.devices / self.unet_s_per_frame)
        return budget

    def free_cores(self) -> float:
        return max(0.0, self.cores - (self.other_cores or 0.0))

    def limit(self) -> str:
        """What sets the budget now, in numbers (said with every refusal)."""
        if self.fixed:
            return f"{OVERRIDE}: {self.fixed:g}"
        per_frame = self.cpu_s_per_frame or self.stage_s_per_frame
        if per_frame is None:
            return "not measured yet"
        cpu = f"{self.cores} cores"
        if (self.other_cores or 0.0) >= 0.05:
            cpu += f", {self.other_cores:.1f} busy elsewhere"
        cpu += f", {per_frame * 1e3:.0f} ms/frame"
        if self.cuda and self.unet_s_per_frame and \
                USABLE * self.devices / self.unet_s_per_frame < USABLE * self.free_cores() / per_frame:
            return f"{self.devices} GPU(s), {self.unet_s_per_frame * 1e3:.1f} ms UNet/frame"
        return cpu

    def rendered_fps(self) -> float:
        """Live sessions' frames rendered per second over the last WINDOW_S."""
        now = time.monotonic()
        while self._rendered and self._rendered[0][0] < now - WINDOW_S:
            self._rendered.popleft()
        return sum(f for _, f in self._rendered) / WINDOW_S

    def snapshot(self) -> dict[str, Any]:
        budget = self.budget_fps()
        return {"budget_fps": None if budget == float("inf") else round(budget, 1),
                "limit": self.limit(),
                "other_cores": round(self.other_cores or 0.0, 2),
                "cpu_ms_per_frame": _ms(self.cpu_s_per_frame),
                "stage_ms_per_frame": _ms(self.stage_s_per_frame),
                "unet_ms_per_frame": _ms(self.unet_s_per_frame)}


class Refused(Exception):
    """A session was not admitted; str() is the reason (said to the client)."""


@dataclass(eq=False)
class Ticket:
    """One admitted stream session's place: counted from admission until released (on every
    ending; releasing twice is harmless). A live session says when an utterance begins and
    what it renders, so its speech is counted before it shows in the measured window."""

    admission: Admission
    address: str
    live: bool
    reserved_until: float = 0.0
    released: bool = False
    _rendered: deque[tuple[float, int]] = field(default_factory=deque)

    def speaking(self) -> None:
        """An utterance begins: reserve 25 frames/s for it (one at a time, per session)."""
        self.reserved_until = time.monotonic() + RESERVE_S

    def quiet(self) -> None:
        """Interrupted: the utterance reserved is not coming."""
        self.reserved_until = 0.0

    def rendered(self, frames: int) -> None:
        if self.reserved_until:
            self._rendered.append((time.monotonic(), frames))

    def unmeasured_fps(self, now: float) -> float:
        """What this session's utterance will need beyond what the window already shows."""
        if now >= self.reserved_until:
            self.reserved_until = 0.0
            self._rendered.clear()
            return 0.0
        while self._rendered and self._rendered[0][0] < now - WINDOW_S:
            self._rendered.popleft()
        return max(0.0, VIDEO_FPS - sum(f for _, f in self._rendered) / WINDOW_S)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.release(self)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """Stream sessions' tickets: the client caps for every session, the frame budget for
    live ones."""

    def __init__(self, cfg: Config, budget: FrameBudget) -> None:
        self.settings = cfg.streaming
        self.budget = budget
        self.speech_share = cfg.streaming.live_speech_share
        self.tickets: set[Ticket] = set()
        self.refused = 0          # live sessions refused for want of capacity

    def check(self, address: str) -> str | None:
        """Why a new session from `address` would be refused by the client caps (None: it
        would not); counts nothing (a WebSocket handshake asks before its upgrade)."""
        if len(self.tickets) >= self.settings.max_clients:
            return f"{self.settings.max_clients} clients connected (MAX_CLIENTS)"
        limit = self.settings.max_sessions_per_address
        if limit and sum(t.address == address for t in self.tickets) >= limit:
            return f"{limit} sessions from this address (streaming.max_sessions_per_address)"
        return None

    def admit(self, address: str, live: bool) -> Ticket:
        """A registered ticket, or Refused with the reason."""
        reason = self.check(address)
        if reason is None and live:
            reason = self._live_refusal()
            if reason is not None:
                self.refused += 1
        if reason is not None:
            raise Refused(reason)
        ticket = Ticket(self, address, live)
        self.tickets.add(ticket)
        return ticket

    def release(self, ticket: Ticket) -> None:
        self.tickets.discard(ticket)

    def live_sessions(self) -> int:
        return sum(t.live for t in self.tickets)

    def used_fps(self) -> float:
        now = time.monotonic()
        return self.budget.rendered_fps() + sum(t.unmeasured_fps(now) for t in self.tickets
                                                if t.live)

    def expected_fps(self, sessions: int) -> float:
        """Speech frames/s that `sessions` live sessions are expected to need."""
        return sessions * self.speech_share * VIDEO_FPS

    def _live_refusal(self) -> str | None:
        """Why a live session does not fit now, short enough for a WebSocket close reason
        (123 bytes), naming what limits the budget and the setting that overrides it."""
        budget, used, live = self.budget.budget_fps(), self.used_fps(), self.live_sessions()
        why = self.budget.limit() if self.budget.fixed else f"{self.budget.limit()}; {OVERRIDE}"
        if used + VIDEO_FPS > budget:
            return f"at capacity: {used:.0f} of {budget:.0f} fps in use, {VIDEO_FPS} more needed ({why})"
        if self.expected_fps(live + 1) > budget:
            return f"at capacity: {live} live x {self.expected_fps(1):g} fps expected of {budget:.0f} ({why})"
        return None

    def snapshot(self) -> dict[str, Any]:
        live = self.live_sessions()
        return {**self.budget.snapshot(), "used_fps": round(self.used_fps(), 1),
                "refused": self.refused, "sessions": len(self.tickets), "live_sessions": live,
                "expected_fps": round(self.expected_fps(live), 1)}


def box_cpu_seconds() -> float:
    """CPU seconds the whole box has been busy (every core, every process)."""
    t = psutil.cpu_times()  # Linux: guest time is within user time already
    return t.user + t.nice + t.system + sum(getattr(t, f, 0.0) for f in ("irq", "softirq",
                                                                          "steal"))


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
