"""Streaming sessions under attack and under load, on the real server: a message of many tiny
chunks does not stall the event loop, a frozen frontend does not mistake its own stall for
dead workers, live admission is one act for both transports (a refused session holds
nothing), an interrupt flood reserves nothing it does not use, and StreamAudio has the
WebSocket's limits."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pipeline.client import channel, speech_like_audio
from pipeline.rpc import inference_pb2 as ipb
from pipeline.rpc import inference_pb2_grpc as ipb_grpc
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.conftest import ops_stats, role_pids


def pcm16(seconds: float, seed: int = 0) -> bytes:
    return (np.clip(speech_like_audio(seconds, seed=seed), -1, 1) * 32767).astype("<i2").tobytes()


def live_url(srv, query: str = "") -> str:
    return f"ws://127.0.0.1:{srv.ws_port}/audio?mode=live{query}"


class HealthProbe:
    """Calls Health every 20 ms from a thread; the slowest answer while it ran."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with channel(self.address, retries=False) as ch:
            stub = pb_grpc.MonolithicServiceStub(ch)
            stub.Health(pb.HealthRequest(), timeout=10)  # connected before measuring
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    stub.Health(pb.HealthRequest(), timeout=10)
                except grpc.RpcError as exc:
                    self.errors.append(str(exc.code()))
                self.latencies.append(time.perf_counter() - t0)
                time.sleep(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_message_of_many_tiny_chunks_does_not_stall_the_loop(start_server) -> None:
    """ProcessAudio with 10,000 chunks of 96 samples (60 s of audio, 1.9 MiB): the session
    takes them in linear time and yields between them, so Health answers within 0.3 s
    throughout (the backlog concatenated per chunk stalled the loop 1.5-2 s) and another
    client's requests all succeed. The call itself is given up after 5 s: what it renders
    is not the point."""
    srv = start_server()
    chunk = (np.sin(np.arange(96) / 3) * 8000).astype("<i2").tobytes()
    request = ipb.AudioRequest(audio_chunks=[chunk] * 10_000)
    failures: list[str] = []

    def other_client() -> None:
        with channel(srv.address, retries=False) as ch:
            stub = pb_grpc.MonolithicServiceStub(ch)
            for _ in range(4):
                try:
                    reply = stub.InferBatchComposite(pb.CompositeBatchRequest(
                        model_id="demo", batch_size=2,
                        raw_audio=speech_like_audio(0.68).tobytes()), timeout=60)
                    if not reply.success:
                        failures.append(reply.error)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

    with HealthProbe(srv.address) as probe:
        other = threading.Thread(target=other_client)
        other.start()
        with channel(srv.address, retries=False) as ch:
            try:
                reply = ipb_grpc.InferenceServiceStub(ch).ProcessAudio(request, timeout=5)
                assert reply.status_code == 200, reply.message
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
        other.join()
    assert not failures and not probe.errors, (failures, probe.errors)
    print(f"Health: slowest {max(probe.latencies) * 1e3:.1f} ms of {len(probe.latencies)}")
    assert max(probe.latencies) < 0.3, f"slowest Health answer {max(probe.latencies):.3f} s"


def test_a_frozen_frontend_does_not_fail_its_requests_on_waking(start_server) -> None:
    """SIGSTOP of the frontend for 6 heartbeats while requests are in flight: on waking it
    does not read its own stall as its workers' death; every request succeeds."""
    srv = start_server()
    (frontend,) = role_pids(srv.proc.pid, "frontend")
    results: list[str] = []

    def one() -> None:
        with channel(srv.address, retries=False) as ch:
            try:
                reply = pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(
                    pb.CompositeBatchRequest(model_id="demo", batch_size=16,
                                             raw_audio=speech_like_audio(1.0).tobytes()),
                    timeout=60)
                results.append("ok" if reply.success else reply.error)
            except grpc.RpcError as exc:
                results.append(f"{exc.code()}: {exc.details()}")

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the requests are in flight
    os.kill(frontend, signal.SIGSTOP)
    time.sleep(3.0)
    os.kill(frontend, signal.SIGCONT)
    for t in threads:
        t.join()
    assert results == ["ok"] * 3, results


def _grpc_live(srv, hold: threading.Event) -> tuple[grpc.StatusCode | None, list[str]]:
    """A live StreamAudio that stays open until `hold` is set: its status code (None: it
    was admitted and ended cleanly) and the status types it got."""
    statuses: list[str] = []

    def requests():
        yield pb.StreamAudioRequest(config=pb.StreamConfig(model_id="demo", mode="live"))
        hold.wait(30)

    with channel(srv.address, retries=False) as ch:
        try:
            for r in pb_grpc.MonolithicServiceStub(ch).StreamAudio(requests(), timeout=40):
                if r.WhichOneof("message") == "status_json":
                    statuses.append(json.loads(r.status_json)["type"])
        except grpc.RpcError as exc:
            return exc.code(), statuses
    return None, statuses


def _wait_live_sessions(srv, count: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (capacity := ops_stats(srv.config)["capacity"])["live_sessions"] != count:
        assert time.monotonic() < deadline, capacity
        time.sleep(0.1)
    return capacity


def test_live_admission_is_the_same_on_both_transports_and_refusals_hold_nothing(
        start_server) -> None:
    """capacity_fps 25, each session expected to speak half the time: the WebSocket admits
    two live sessions and so does StreamAudio; 30 refused StreamAudio attempts leave no
    phantom session, so once the two close, two are admitted again."""
    srv = start_server(**{"streaming.capacity_fps": 25, "streaming.live_speech_share": 0.5})

    async def websocket_admits() -> int:
        admitted = 0
        async with connect(live_url(srv)) as a, connect(live_url(srv)) as b:
            for ws in (a, b):
                assert json.loads(await ws.recv())["type"] == "ready"
                admitted += 1
            third = await connect(live_url(srv))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await third.recv()
            assert closed.value.rcvd.code == 1013
        return admitted

    assert asyncio.run(websocket_admits()) == 2
    _wait_live_sessions(srv, 0)

    def grpc_round(refusals: int) -> None:
        hold = threading.Event()
        results: list[tuple[grpc.StatusCode | None, list[str]]] = []
        holders = [threading.Thread(target=lambda: results.append(_grpc_live(srv, hold)))
                   for _ in range(2)]
        for t in holders:
            t.start()
        try:
            _wait_live_sessions(srv, 2)
            for _ in range(refusals):
                code, _ = _grpc_live(srv, threading.Event())
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, code
            assert ops_stats(srv.config)["capacity"]["live_sessions"] == 2
        finally:
            hold.set()
            for t in holders:
                t.join()
        assert [code for code, _ in results] == [None, None], results

    grpc_round(30)
    _wait_live_sessions(srv, 0)
    grpc_round(1)  # nothing of the refused attempts is left holding the budget


def test_an_interrupt_flood_reserves_no_capacity_it_does_not_use(start_server) -> None:
    """One live session sends audio and an interrupt 40 times: it reserves at most one
    utterance's 25 frames/s, not 25 per interrupt, so a second session is still admitted."""
    srv = start_server(**{"streaming.capacity_fps": 100, "streaming.live_speech_share": 0})

    async def run() -> tuple[float, int]:
        async with connect(live_url(srv)) as ws:
            await ws.recv()
            for i in range(40):
                await ws.send(pcm16(0.1, seed=i))
                await ws.send(json.dumps({"type": "interrupt"}))
            await asyncio.sleep(0.2)
            used = ops_stats(srv.config)["capacity"]["used_fps"]
            async with connect(live_url(srv)) as second:
                first = json.loads(await second.recv())
            return used, first["type"] == "ready"

    used, admitted = asyncio.run(run())
    assert used <= 75, used  # one reservation (25) and what is really rendered
    assert admitted


def test_stream_audio_is_bounded_like_the_websocket(start_server) -> None:
    """StreamAudio takes the WebSocket's limits from the same settings: a stream that says
    nothing for idle_timeout_s is ended, a third stream from one address is refused
    (max_sessions_per_address 2), and a client over the message rate is ended."""
    srv = start_server(**{"streaming.idle_timeout_s": 1.0,
                          "streaming.max_sessions_per_address": 2,
                          "streaming.rate_limit_messages_per_s": 20})
    stub_channel = channel(srv.address, retries=False)
    stub = pb_grpc.MonolithicServiceStub(stub_channel)

    # idle: config, then nothing
    hold = threading.Event()

    def idle_requests():
        yield pb.StreamAudioRequest(config=pb.StreamConfig(model_id="demo"))
        hold.wait(10)

    t0 = time.monotonic()
    statuses = []
    try:
        for r in stub.StreamAudio(idle_requests(), timeout=8):
            statuses.append(json.loads(r.status_json))
    except grpc.RpcError as exc:
        pytest.fail(f"an idle stream should end cleanly, got {exc.code()}: {exc.details()}")
    finally:
        hold.set()
    assert time.monotonic() - t0 < 4.0
    assert statuses[-1]["type"] == "error" and "idle" in statuses[-1]["message"], statuses

    # per address: two held, the third refused
    hold = threading.Event()

    def held_requests():
        yield pb.StreamAudioRequest(config=pb.StreamConfig(model_id="demo"))
        while not hold.wait(0.3):
            yield pb.StreamAudioRequest(audio=b"")  # not idle

    calls = [stub.StreamAudio(held_requests(), timeout=30) for _ in range(2)]
    try:
        for call in calls:
            assert json.loads(next(call).status_json)["type"] == "ready"
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.StreamAudio(iter([pb.StreamAudioRequest(
                config=pb.StreamConfig(model_id="demo"))]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions_per_address" in refused.value.details()
    finally:
        hold.set()
        for call in calls:
            call.cancel()

    # message rate: 200 messages at once, 20/s allowed (a burst of 40)
    def flood():
        yield pb.StreamAudioRequest(config=pb.StreamConfig(model_id="demo"))
        for _ in range(200):
            yield pb.StreamAudioRequest(audio=b"\x00\x00" * 16)
        time.sleep(2)

    deadline = time.monotonic() + 10
    while ops_stats(srv.config)["streams"]["sessions"]:  # the held streams have ended
        assert time.monotonic() < deadline
        time.sleep(0.1)
    statuses = [json.loads(r.status_json) for r in stub.StreamAudio(flood(), timeout=20)
                if r.WhichOneof("message") == "status_json"]
    assert statuses[-1] == {"type": "error", "message": "rate limit exceeded"}, statuses
    stub_channel.close()


def test_the_live_budget_is_known_from_the_start_and_a_refusal_says_why(start_server) -> None:
    """Right after start, before any session, the budget is measured (from the model's
    warm-up), not unlimited; a refusal names what limits it and the setting that overrides."""
    srv = start_server(**{"streaming.live_speech_share": 1.0})
    capacity = ops_stats(srv.config)["capacity"]
    assert capacity["budget_fps"] is not None and capacity["budget_fps"] > 0, capacity
    sessions = int(capacity["budget_fps"] // 25) + 1

    async def run() -> tuple[int, str]:
        opened = []
        try:
            for _ in range(sessions):
                ws = await connect(live_url(srv))
                opened.append(ws)
                first = json.loads(await ws.recv())
                if first["type"] != "ready":  # refused: the reason, then the close
                    assert first["type"] == "error", first
                    await ws.wait_closed()
                    assert ws.close_code is not None
                    return ws.close_code, ws.close_reason or ""
        except InvalidStatus as exc:
            return exc.response.status_code, exc.response.body.decode()
        finally:
            for ws in opened:
                await ws.close()
        return 0, ""

    code, reason = asyncio.run(run())
    assert code == 1013, (code, reason)
    assert "streaming.capacity_fps" in reason, reason
