"""Scale-out on loopback: three `lipsync serve` boxes sharing one config of six on-demand
avatars, behind a real HAProxy configured by `lipsync lb-config`."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from websockets.asyncio.client import connect

from pipeline.bench.local_cluster import LocalCluster, find_haproxy
from pipeline.client import channel, parse_frame_message, speech_like_audio
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.conftest import SMALL_FRAMES, write_config

pytestmark = pytest.mark.skipif(
    find_haproxy() is None,
    reason="haproxy is not installed (Debian: apt-get install haproxy; .ci/run does it)")

AVATARS = ("anna", "ben", "carla", "dev", "emil", "fay")
AUDIO = speech_like_audio((2 + 15) * 0.04).tobytes()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, small_models_root: Path):
    tmp = tmp_path_factory.mktemp("scaleout")
    avatar = {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
              "crop_rects_path": "demo/crop_rects.json", "num_frames": SMALL_FRAMES}
    config = write_config(tmp / "config.yaml", small_models_root, **{
        "models": {a: dict(avatar) for a in AVATARS},
        "compositor.pool_size": 1, "runtime.arena_mb": 128,
        "server.drain_delay_s": 1.5, "server.shutdown_grace_s": 3})
    with LocalCluster(config, 3, tmp / "cluster") as started:
        yield started


def infer(stub: pb_grpc.MonolithicServiceStub, model: str,
          **call: object) -> pb.CompositeBatchResponse:
    return stub.InferBatchComposite(pb.CompositeBatchRequest(
        model_id=model, raw_audio=AUDIO, batch_size=2), timeout=30, **call)


def placement(cluster: LocalCluster, skip: int = 0) -> dict[str, list[int]]:
    """Avatar -> the boxes (but box `skip`) that have it loaded, from their ListModels."""
    where: dict[str, list[int]] = {a: [] for a in AVATARS}
    for box in cluster.boxes:
        if box.index == skip:
            continue
        with channel(box.server.address) as ch:
            models = pb_grpc.MonolithicServiceStub(ch).ListModels(pb.ListModelsRequest(),
                                                                  timeout=10).models
        for m in models:
            if m.loaded:
                where[m.model_id].append(box.index)
    return where


def backend_sessions(cluster: LocalCluster, backend: str) -> int:
    assert cluster.balancer is not None
    return next(int(row["stot"]) for row in cluster.balancer.stats()
                if row["pxname"] == backend and row["svname"] == "BACKEND")


def test_each_avatar_is_loaded_on_exactly_one_box_spread_over_boxes(cluster: LocalCluster) -> None:
    """Calls with x-model-id (our channel) for six avatars succeed; each avatar is loaded on
    exactly one box, and they are spread over at least two boxes."""
    assert cluster.balancer is not None
    with channel(cluster.balancer.grpc_address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        for _ in range(2):
            for avatar in AVATARS:
                resp = infer(stub, avatar)
                assert resp.success and len(resp.composited_frames) == 2, resp.error
    where = placement(cluster)
    assert all(len(boxes) == 1 for boxes in where.values()), where
    assert len({boxes[0] for boxes in where.values()}) >= 2, where


def test_websocket_through_the_balancer_follows_the_same_box(cluster: LocalCluster) -> None:
    """1 s of audio over WebSocket through the balancer gives 25 frames, from the box that
    serves the avatar's gRPC calls (URL parameter and header hash alike)."""
    assert cluster.balancer is not None
    with channel(cluster.balancer.grpc_address) as ch:
        assert infer(pb_grpc.MonolithicServiceStub(ch), "carla").success
    before = placement(cluster)["carla"]
    pcm = (np.clip(speech_like_audio(1.0), -1, 1) * 32767).astype("<i2").tobytes()

    async def session() -> list[int]:
        url = f"ws://{cluster.balancer.ws_address}/audio?model=carla"
        async with connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            for i in range(0, len(pcm), 1280):  # 40 ms messages
                await ws.send(pcm[i:i + 1280])
            await ws.send(json.dumps({"type": "flush"}))
            frames = []
            while True:
                message = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(message, str):
                    status = json.loads(message)
                    assert status["type"] != "error", status
                    if status["type"] == "flushed":
                        return frames
                else:
                    frames.append(parse_frame_message(message).index)

    assert asyncio.run(session()) == list(range(25))
    assert placement(cluster)["carla"] == before and len(before) == 1


def test_the_balancer_logs_the_path_without_the_token(cluster: LocalCluster) -> None:
    """A browser's WebSocket carries its token in the URL (?token=): HAProxy's log line of
    the session names the path, never the query and its token."""
    assert cluster.balancer is not None
    secret = "url-token-that-must-not-be-logged"

    async def session() -> None:
        url = f"ws://{cluster.balancer.ws_address}/audio?model=dev&token={secret}"
        async with connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"

    asyncio.run(session())
    deadline = time.monotonic() + 10
    while True:  # HAProxy writes a tunnel's line when it ends
        lines = [line for line in cluster.balancer.log_path.read_text().splitlines()
                 if "websocket" in line and "/audio" in line]
        if lines:
            break
        assert time.monotonic() < deadline, cluster.balancer.log_path.read_text()[-2000:]
        time.sleep(0.1)
    assert secret not in cluster.balancer.log_path.read_text()
    assert '"GET /audio HTTP/1.1"' in lines[-1], lines[-1]


def test_a_call_without_the_header_is_served_by_the_least_busy_box(cluster: LocalCluster) -> None:
    """A client built from the seed's proto (no x-model-id, no retry policy) is served, via
    the least-connections backend."""
    assert cluster.balancer is not None
    before = backend_sessions(cluster, "grpc_least_conn")
    with grpc.insecure_channel(cluster.balancer.grpc_address) as ch:
        resp = infer(pb_grpc.MonolithicServiceStub(ch), "dev")
    assert resp.success and len(resp.composited_frames) == 2, resp.error
    assert backend_sessions(cluster, "grpc_least_conn") == before + 1


def test_sigterm_of_a_box_moves_its_avatars_without_failed_calls(cluster: LocalCluster) -> None:
    """SIGTERM of one box: out of rotation within 2 s, its avatars served by the others
    within 3 s; calls caught in the drain fail only as UNAVAILABLE (none for our retrying
    channel), none hangs, and the box exits 0."""
    assert cluster.balancer is not None
    address = cluster.balancer.grpc_address
    with channel(address) as ch:
        for avatar in AVATARS:
            assert infer(pb_grpc.MonolithicServiceStub(ch), avatar).success
    where = placement(cluster)
    victim = max(cluster.boxes, key=lambda b: sum(boxes == [b.index] for boxes in where.values()))
    moving = [a for a, boxes in where.items() if boxes == [victim.index]]
    assert moving, where
    outcomes: list[tuple[str, str, float, float, str]] = []
    stop = threading.Event()

    def client(kind: str, avatar: str) -> None:
        # "seed": a client with the header but no retry policy; "ours": pipeline's channel
        ch = grpc.insecure_channel(address) if kind == "seed" else channel(address)
        metadata = (("x-model-id", avatar),) if kind == "seed" else None
        stub = pb_grpc.MonolithicServiceStub(ch)
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                resp = infer(stub, avatar, metadata=metadata)
                outcome = "ok" if resp.success else f"error: {resp.error}"
            except grpc.RpcError as exc:
                outcome = exc.code().name
                time.sleep(0.05)
            outcomes.append((kind, avatar, t0, time.monotonic(), outcome))
        ch.close()

    threads = [threading.Thread(target=client, args=(kind, a), daemon=True)
               for a in moving for kind in ("seed", "ours")]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        sigterm = time.monotonic()
        victim.server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        cluster.balancer.wait(lambda states: states[f"box{victim.index}"].startswith("DOWN"),
                              2.5)
        out_of_rotation = time.monotonic() - sigterm
        while True:  # the victim no longer answers ListModels once it stopped its server
            placed = placement(cluster, skip=victim.index)
            if all(placed[a] for a in moving):
                break
            assert time.monotonic() - sigterm < 3.0, placed
            time.sleep(0.05)
        moved = time.monotonic() - sigterm
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(40)
    assert not any(t.is_alive() for t in threads)
    assert victim.server.proc.wait(15) == 0  # type: ignore[union-attr]
    assert out_of_rotation <= 2.0 and moved <= 3.0
    assert {o for kind, _, _, _, o in outcomes if kind == "seed"} <= {"ok", "UNAVAILABLE"}
    assert {o for kind, _, _, _, o in outcomes if kind == "ours"} == {"ok"}
    assert max(end - start for _, _, start, end, _ in outcomes) < 10  # none hung
    late = {a for _, a, start, _, o in outcomes if o == "ok" and start > sigterm + moved}
    assert late == set(moving)  # served again after the move, by the other boxes
