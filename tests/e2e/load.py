"""Clients that keep a real server busy and check every frame they get back: the load
under which the role-failure tests kill, freeze or break a role."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Self

import grpc

from pipeline.client import channel, speech_like_audio
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.helpers import FrameOracle


@dataclass(frozen=True)
class Outcome:
    started: float                      # time.monotonic()
    ended: float
    kind: str                           # "ok", "wrong frames", "failed", or a gRPC status name
    detail: str = ""


class Load:
    """`clients` threads sending audio-only requests of `batch` frames without pause, with
    start frames all over the avatar; every JPEG is checked to be the right frame."""

    def __init__(self, address: str, oracle: FrameOracle, clients: int = 4,
                 batch: int = 4) -> None:
        self.address, self.oracle, self.batch = address, oracle, batch
        self.frames = len(oracle.corners)
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(c,)) for c in range(clients)]
        self._audio = speech_like_audio((batch + 15) * 0.04).tobytes()

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _client(self, c: int) -> None:
        with channel(self.address, retries=False) as ch:  # each failure as the server says it
            stub = pb_grpc.MonolithicServiceStub(ch)
            r = 0
            while not self._stop.is_set():
                start = (c * 11 + r * 5) % self.frames
                r += 1
                t0 = time.monotonic()
                try:
                    kind, detail = self._request(stub, start)
                except Exception as exc:
                    kind, detail = "client error", repr(exc)
                self.outcomes.append(Outcome(t0, time.monotonic(), kind, detail))
                if kind != "ok":
                    time.sleep(0.05)

    def _request(self, stub: pb_grpc.MonolithicServiceStub, start: int) -> tuple[str, str]:
        """One request: its outcome's kind and detail."""
        try:
            resp = stub.InferBatchComposite(pb.CompositeBatchRequest(
                model_id="demo", raw_audio=self._audio, batch_size=self.batch,
                start_frame_idx=start), timeout=60)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""
        if not resp.success:
            return "failed", resp.error
        got = self.oracle.frames(list(resp.composited_frames))
        want = [(start + i) % self.frames for i in range(self.batch)]
        return ("ok", "") if got == want else ("wrong frames", f"{got} != {want}")

    def problems(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind != "ok"]

    def ended_between(self, t0: float, t1: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == "ok" and t0 < o.ended < t1]
