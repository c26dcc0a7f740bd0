"""Model lifecycle on the real server: 2 CPU gpu_workers, max_models 2, three avatars that
can be told apart (a coloured marker per model, a frame counter per frame)."""
from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from pipeline.bench.local_server import ServerProcess
from pipeline.client import channel
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from pipeline.shm.segment import list_segments
from tests.conftest import child_pids, ops_stats, write_config

FRAMES = 10
MARKERS = {"red": (0, 0, 255), "green": (0, 255, 0), "blue": (255, 0, 0)}  # BGR
MARKER_BOX = (1180, 20, 1260, 100)  # x1, y1, x2, y2: top right, far from the face
COUNTER_BOX = (20, 20, 340, 135)


def make_avatar(models_root: Path, name: str, colour: tuple[int, int, int], frames: int) -> dict:
    """An avatar dir with the demo's first frames plus a solid marker in the corner."""
    out = models_root / name
    if not out.exists():
        (out / "frames").mkdir(parents=True)
        x1, y1, x2, y2 = MARKER_BOX
        for i in range(frames):
            frame = cv2.imread(str(models_root / "demo" / "frames" / f"frame_{i:04d}.jpg"))
            frame[y1:y2, x1:x2] = colour
            cv2.imwrite(str(out / "frames" / f"frame_{i:04d}.jpg"), frame)
        shutil.copy(models_root / "demo" / "crop_rects.json", out / "crop_rects.json")
    return {"model_path": "demo/unet.onnx", "background_dir": f"{name}/frames",
            "crop_rects_path": f"{name}/crop_rects.json", "num_frames": frames}


def model_config(models_root: Path, frames: int = FRAMES, **extra: dict) -> dict:
    models = {name: make_avatar(models_root, name, colour, frames)
              for name, colour in MARKERS.items()}
    models["green"]["preferred_gpu"] = 0
    for name, fields in extra.items():
        models.setdefault(name, {}).update(fields)
    return models


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_root: Path):
    tmp = tmp_path_factory.mktemp("models_server")
    models = model_config(models_root)
    models["broken"] = {"model_path": "missing/unet.onnx", "background_dir": "demo/frames",
                        "crop_rects_path": "demo/crop_rects.json", "num_frames": FRAMES}
    models["slow"] = {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
                      "crop_rects_path": "demo/crop_rects.json", "num_frames": 250}
    config = write_config(tmp / "config.yaml", models_root, **{
        "gpus.count": 2, "capacity.max_models": 2, "models": models,
        "compositor.pool_size": 2})
    with ServerProcess(config, log_path=tmp / "server.log") as srv:
        srv.instance = yaml.safe_load(config.read_text())["runtime"]["instance"]  # type: ignore[attr-defined]
        yield srv


@pytest.fixture
def stub(server: ServerProcess):
    with channel(server.address) as ch:
        s = pb_grpc.MonolithicServiceStub(ch)
        for m in s.ListModels(pb.ListModelsRequest(), timeout=10).models:  # start from empty
            if m.loaded:
                assert s.UnloadModel(pb.UnloadModelRequest(model_id=m.model_id), timeout=60).success
        yield s


def infer(stub, model: str, start: int, batch: int = 2) -> pb.CompositeBatchResponse:
    """A request with audio alone (the server builds the visual input)."""
    audio = np.sin(np.arange((batch + 15) * 640) / 9.0).astype(np.float32) * 0.3
    return stub.InferBatchComposite(pb.CompositeBatchRequest(
        model_id=model, raw_audio=audio.tobytes(), batch_size=batch, start_frame_idx=start),
        timeout=120)


def which_model(jpeg: bytes) -> str:
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    x1, y1, x2, y2 = MARKER_BOX
    patch = frame[y1 + 10:y2 - 10, x1 + 10:x2 - 10].reshape(-1, 3).mean(axis=0)
    return min(MARKERS, key=lambda name: np.abs(patch - MARKERS[name]).sum())


def which_frame(jpeg: bytes, counters: np.ndarray) -> int:
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    x1, y1, x2, y2 = COUNTER_BOX
    corner = frame[y1:y2, x1:x2].astype(np.float32)
    return int(np.argmin(np.abs(counters - corner).mean(axis=(1, 2, 3))))


@pytest.fixture(scope="module")
def counters(models_root: Path) -> np.ndarray:
    x1, y1, x2, y2 = COUNTER_BOX
    return np.stack([cv2.imread(str(models_root / "demo" / "frames" / f"frame_{i:04d}.jpg"))
                     [y1:y2, x1:x2] for i in range(FRAMES)]).astype(np.float32)


def states(stub) -> dict[str, tuple[str, int]]:
    return {m.model_id: (pb.ModelState.Name(m.state), m.gpu_id)
            for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}


def test_loads_go_where_asked(stub) -> None:
    """preferred_gpu from the request wins, else the config's, else the least-loaded device."""
    red = stub.LoadModel(pb.LoadModelRequest(model_id="red", preferred_gpu=1), timeout=60)
    assert (red.success, red.gpu_id) == (True, 1), red.error
    green = stub.LoadModel(pb.LoadModelRequest(model_id="green"), timeout=60)  # config: gpu 0
    assert (green.success, green.gpu_id) == (True, 0), green.error
    stub.UnloadModel(pb.UnloadModelRequest(model_id="green"), timeout=60)
    # gpu 1 holds red: the least-loaded device by measured memory is gpu 0
    blue = stub.LoadModel(pb.LoadModelRequest(model_id="blue", preferred_gpu=-1), timeout=60)
    assert (blue.success, blue.gpu_id) == (True, 0), blue.error
    assert states(stub)["red"] == ("MODEL_STATE_READY", 1)
    assert states(stub)["green"] == ("MODEL_STATE_UNLOADED", -1)
    bad = stub.LoadModel(pb.LoadModelRequest(model_id="red", preferred_gpu=2), timeout=10)
    assert not bad.success and "preferred_gpu 2" in bad.error


def test_the_least_recently_used_model_is_evicted(stub) -> None:
    """max_models 2: loading a third model evicts the least recently used one."""
    assert stub.LoadModel(pb.LoadModelRequest(model_id="red"), timeout=60).success
    assert stub.LoadModel(pb.LoadModelRequest(model_id="green"), timeout=60).success
    assert infer(stub, "red", 0).success  # red is now the most recently used
    assert stub.LoadModel(pb.LoadModelRequest(model_id="blue"), timeout=60).success
    s = states(stub)
    assert s["red"][0] == s["blue"][0] == "MODEL_STATE_READY"
    assert s["green"] == ("MODEL_STATE_UNLOADED", -1)
    health = stub.Health(pb.HealthRequest(), timeout=10)
    assert (health.loaded_models, health.max_models, list(health.gpu_ids)) == (2, 2, [0, 1])
    assert len(health.gpu_memory_used_gb) == 2 and all(g > 0 for g in health.gpu_memory_used_gb)


def test_a_model_in_flight_is_never_evicted(stub, server) -> None:
    """The LRU model is busy: the load of a third model evicts the other one instead."""
    assert stub.LoadModel(pb.LoadModelRequest(model_id="red"), timeout=60).success
    assert stub.LoadModel(pb.LoadModelRequest(model_id="green"), timeout=60).success  # red is LRU
    with ThreadPoolExecutor(4) as pool, channel(server.address) as ch:
        busy = [pool.submit(infer, pb_grpc.MonolithicServiceStub(ch), "red", i, 32)
                for i in range(4)]
        time.sleep(0.3)  # red's requests are in flight
        assert not all(f.done() for f in busy)
        blue = stub.LoadModel(pb.LoadModelRequest(model_id="blue"), timeout=60)
        results = [f.result() for f in busy]
    assert blue.success, blue.error
    assert all(r.success and len(r.composited_frames) == 32 for r in results)
    s = states(stub)
    assert s["red"][0] == "MODEL_STATE_READY" and s["green"][0] == "MODEL_STATE_UNLOADED"


def test_stats_are_exact_under_concurrency(stub, server) -> None:
    """N concurrent requests add exactly N to request_count; total and average agree."""
    before = {m.model_id: m for m in stub.GetModelStats(pb.GetModelStatsRequest(), timeout=10).models}
    with ThreadPoolExecutor(8) as pool, channel(server.address) as ch:
        s = pb_grpc.MonolithicServiceStub(ch)
        results = list(pool.map(lambda i: infer(s, "blue", i), range(24)))
    assert all(r.success for r in results)
    after = {m.model_id: m for m in stub.GetModelStats(pb.GetModelStatsRequest(), timeout=10).models}
    blue = after["blue"]
    assert blue.request_count == before["blue"].request_count + 24
    assert blue.loaded and blue.memory_mb > 0 and blue.gpu_id in (0, 1)
    assert blue.state == pb.MODEL_STATE_READY
    assert abs(blue.avg_inference_ms * blue.request_count - blue.total_inference_ms) <= blue.request_count
    assert blue.last_used_timestamp >= int(time.time()) - 10
    listed = {m.model_id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert listed["blue"].request_count == blue.request_count
    assert set(listed) == {"red", "green", "blue", "broken", "slow"}


def test_unloading_an_unloaded_model_is_a_clear_error(stub) -> None:
    """UnloadModel of a model that is not loaded says so; of an unknown one, too."""
    r = stub.UnloadModel(pb.UnloadModelRequest(model_id="green"), timeout=10)
    assert (r.success, r.error) == (False, "Failed to unload model: model 'green' not loaded")
    r = stub.UnloadModel(pb.UnloadModelRequest(model_id="nobody"), timeout=10)
    assert (r.success, r.error) == (False, "Failed to unload model: model 'nobody' not configured")


def test_a_failed_load_leaves_a_reason_and_nothing_loaded(stub, server) -> None:
    """A model whose file is missing: FAILED with the reason, nothing held, others unaffected."""
    segments = set(list_segments(server.instance))
    r = stub.LoadModel(pb.LoadModelRequest(model_id="broken"), timeout=60)
    assert not r.success and "Failed to load model" in r.error and "unet.onnx" in r.error
    listed = {m.model_id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert listed["broken"].state == pb.MODEL_STATE_FAILED and listed["broken"].error
    assert not listed["broken"].loaded and listed["broken"].gpu_id == -1
    assert set(list_segments(server.instance)) == segments
    resp = infer(stub, "broken", 0)
    assert not resp.success and resp.error.startswith("Failed to load model 'broken'")
    assert infer(stub, "red", 0).success


def test_concurrent_loads_of_one_model_coalesce(stub, server) -> None:
    """Eight concurrent LoadModel calls of one model run one load (one background segment)."""
    segments = set(list_segments(server.instance))
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(
            lambda _: stub.LoadModel(pb.LoadModelRequest(model_id="green"), timeout=60), range(8)))
    assert all(r.success for r in replies)
    assert len({r.gpu_id for r in replies}) == 1
    new = set(list_segments(server.instance)) - segments
    assert len([n for n in new if "-bg" in n]) == 1


def test_a_load_does_not_block_other_models(stub, server) -> None:
    """While a 250-frame avatar loads, requests for a loaded model keep being answered."""
    assert stub.LoadModel(pb.LoadModelRequest(model_id="red"), timeout=60).success
    done = threading.Event()
    load_result: list[pb.LoadModelResponse] = []

    def load_slow() -> None:
        load_result.append(stub.LoadModel(pb.LoadModelRequest(model_id="slow", preferred_gpu=0),
                                          timeout=120))
        done.set()

    thread = threading.Thread(target=load_slow)
    thread.start()
    answered_during_load = 0
    while not done.is_set():
        t0 = time.monotonic()
        assert infer(stub, "red", 0, batch=1).success
        if not done.is_set():
            answered_during_load += 1
            assert time.monotonic() - t0 < 2.0
    thread.join()
    assert load_result[0].success, load_result[0].error
    assert answered_during_load >= 2


def test_on_demand_load_reports_model_loaded(stub) -> None:
    """A request for an unloaded model loads it, sets model_loaded and the load time."""
    first = infer(stub, "blue", 3)
    assert first.success and first.model_loaded and first.model_load_time_ms > 0
    second = infer(stub, "blue", 3)
    assert second.success and not second.model_loaded


def test_soak_with_constant_evictions(server, counters) -> None:
    """16 clients over 3 models with max_models 2: every response right and its own."""
    deadline = time.monotonic() + 50
    errors: list[str] = []

    def client(c: int) -> int:
        done = 0
        with channel(server.address) as ch:
            s = pb_grpc.MonolithicServiceStub(ch)
            for r in range(4):
                if time.monotonic() > deadline:
                    break
                model = list(MARKERS)[(c + r) % 3]
                start = (c * 3 + r) % FRAMES
                resp = infer(s, model, start)
                if not resp.success:
                    errors.append(f"{model}: {resp.error}")
                    continue
                got = [(which_model(j), which_frame(j, counters)) for j in resp.composited_frames]
                want = [(model, (start + i) % FRAMES) for i in range(2)]
                if got != want:
                    errors.append(f"client {c} request {r}: got {got}, want {want}")
                done += 1
        return done

    with ThreadPoolExecutor(16) as pool:
        done = sum(pool.map(client, range(16)))
    assert errors == []
    assert done == 64


def test_idle_models_are_unloaded_and_memory_budget_evicts(tmp_path: Path, models_root: Path) -> None:
    """idle_timeout_minutes unloads an unused model; max_memory_gb evicts on the same device."""
    models = model_config(models_root)
    for name in MARKERS:
        models[name]["preferred_gpu"] = 0
    big = {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
           "crop_rects_path": "demo/crop_rects.json", "num_frames": 250, "preferred_gpu": 0}
    models["big1"], models["big2"] = big, dict(big)
    config = write_config(tmp_path / "config.yaml", models_root, **{
        "models": models, "capacity.idle_timeout_minutes": 0.05,
        "capacity.max_memory_gb": 1.0})
    with ServerProcess(config, log_path=tmp_path / "server.log") as srv, channel(srv.address) as ch:
        s = pb_grpc.MonolithicServiceStub(ch)
        # each 250-frame avatar holds ~0.69 GB of backgrounds: two do not fit in 1 GB
        assert s.LoadModel(pb.LoadModelRequest(model_id="big1"), timeout=60).success
        assert s.LoadModel(pb.LoadModelRequest(model_id="big2"), timeout=60).success
        st = states(s)
        assert st["big2"][0] == "MODEL_STATE_READY" and st["big1"][0] == "MODEL_STATE_UNLOADED"
        assert s.UnloadModel(pb.UnloadModelRequest(model_id="big2"), timeout=60).success
        assert infer(s, "red", 0).success
        assert states(s)["red"][0] == "MODEL_STATE_READY"
        deadline = time.monotonic() + 20  # idle timeout 3 s
        while states(s)["red"][0] != "MODEL_STATE_UNLOADED" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert states(s)["red"] == ("MODEL_STATE_UNLOADED", -1)


def test_unload_frees_the_backgrounds_everywhere(stub, server) -> None:
    """UnloadModel unlinks the model's background segment and every process unmaps it."""
    before = {n for n in list_segments(server.instance) if "-bg" in n}
    assert stub.LoadModel(pb.LoadModelRequest(model_id="green"), timeout=60).success
    assert infer(stub, "green", 1).success  # a compositor has mapped the segment
    added = {n for n in list_segments(server.instance) if "-bg" in n} - before
    assert len(added) == 1
    (segment,) = added
    mapped_by = [pid for pid in child_pids(server.proc.pid)
                 if segment in Path(f"/proc/{pid}/maps").read_text()]
    assert len(mapped_by) >= 2  # the worker that loaded it and a compositor
    assert stub.UnloadModel(pb.UnloadModelRequest(model_id="green"), timeout=60).success
    assert segment not in list_segments(server.instance)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
            segment in Path(f"/proc/{pid}/maps").read_text() for pid in mapped_by):
        time.sleep(0.1)
    assert [pid for pid in mapped_by if segment in Path(f"/proc/{pid}/maps").read_text()] == []


def test_eviction_never_starves(tmp_path: Path, models_root: Path, counters) -> None:
    """max_models 1 and three clients on three models: every request is served (slower,
    never timed out) with its own model's frames, and the eviction rate is reported. A
    load used to evict a model within a millisecond of it becoming READY, before the
    requests that waited for it had run: no request was ever served."""
    config = write_config(tmp_path / "config.yaml", models_root, **{
        "models": model_config(models_root), "capacity.max_models": 1,
        "server.request_timeout_s": 60})
    errors: list[str] = []

    def client(srv: ServerProcess, model: str) -> int:
        served = 0
        with channel(srv.address) as ch:
            s = pb_grpc.MonolithicServiceStub(ch)
            for r in range(4):
                resp = infer(s, model, r)
                got = [which_model(j) for j in resp.composited_frames]
                if not resp.success or got != [model, model]:
                    errors.append(f"{model} request {r}: {resp.error or got}")
                    continue
                served += 1
        return served

    with ServerProcess(config, log_path=tmp_path / "server.log") as srv:
        with ThreadPoolExecutor(3) as pool:
            served = sum(pool.map(lambda m: client(srv, m), MARKERS))
        stats = ops_stats(config)
    assert errors == []
    assert served == 12
    assert stats["evictions"] >= 2
    assert stats["evictions_last_minute"] == stats["evictions"]
