"""The real multi-process server (`lipsync serve`) driven by a gRPC client built from proto/."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import yaml

from pipeline.bench.local_server import ServerProcess
from pipeline.client import build_request, channel, speech_like_audio
from pipeline.demo.assets import COUNTER_BOX
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from pipeline.shm.segment import list_segments
from tests.conftest import SMALL_FRAMES as FRAMES
from tests.conftest import child_pids, role_pids, write_config

VISUAL_FRAME_BYTES = 6 * 320 * 320 * 4


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(**{"models.other": {"model_path": "demo/unet.onnx",
                                            "background_dir": "demo/frames",
                                            "crop_rects_path": "demo/crop_rects.json",
                                            "num_frames": FRAMES}})


@pytest.fixture(scope="module")
def stub(server: ServerProcess):
    with channel(server.address) as ch:
        yield pb_grpc.MonolithicServiceStub(ch)


def request(server: ServerProcess, batch: int, start: int, **fields: object) -> pb.CompositeBatchRequest:
    req = build_request(server.config, "demo", batch, start)  # type: ignore[attr-defined]
    for name, value in fields.items():
        setattr(req, name, value)
    return req


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_batch_returns_the_right_background_frames(stub, server, oracle, batch: int) -> None:
    """Batch 1, 8 and 32: B JPEGs of the background's size, each the right background frame."""
    start = FRAMES - 10  # crosses the wrap for the larger batches
    resp = stub.InferBatchComposite(request(server, batch, start), timeout=120)
    assert resp.success, resp.error
    assert len(resp.composited_frames) == batch
    for i, jpeg in enumerate(resp.composited_frames):
        frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert frame.shape == (720, 1280, 3)
        assert oracle.frame(jpeg) == (start + i) % FRAMES
    assert resp.gpu_id == 0
    assert resp.inference_time_ms > 0 and resp.audio_processing_ms > 0
    assert resp.composite_time_ms > 0
    assert resp.total_time_ms >= resp.inference_time_ms + resp.audio_processing_ms


def test_huge_start_index_wraps(stub, server, oracle) -> None:
    """A start index far past the frame count wraps modulo the background count."""
    start = 2**31 - 1 - 4
    resp = stub.InferBatchComposite(request(server, 4, start), timeout=60)
    assert resp.success, resp.error
    assert [oracle.frame(j) for j in resp.composited_frames] == \
        [(start + i) % FRAMES for i in range(4)]


def test_speech_opens_the_mouth_and_silence_closes_it(stub, server) -> None:
    """The same frames differ in the mouth region between speech and silent audio."""
    speech = stub.InferBatchComposite(request(server, 4, 0), timeout=60)
    silence = stub.InferBatchComposite(
        request(server, 4, 0, raw_audio=np.zeros(19 * 640, np.float32).tobytes()), timeout=60)
    assert speech.success and silence.success
    diffs = []
    for a, b in zip(speech.composited_frames, silence.composited_frames, strict=True):
        fa = cv2.imdecode(np.frombuffer(a, np.uint8), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        fb = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        diffs.append(np.abs(fa - fb))
    # some frame's mouth moved a lot, and nothing changed in the counter corner
    assert max(d.max() for d in diffs) > 100
    x1, y1, x2, y2 = COUNTER_BOX
    assert max(d[y1:y2, x1:x2].max() for d in diffs) < 1


@pytest.mark.parametrize("fields, error", [
    ({"model_id": ""}, "model_id is required"),
    ({"batch_size": 0}, "batch_size must be 1-32, got 0"),
    ({"batch_size": 33}, "batch_size must be 1-32, got 33"),
    ({"batch_size": -5}, "batch_size must be 1-32, got -5"),
    ({"visual_frames": b"\0" * 100},
     f"Invalid visual frames size: got 100 bytes, expected {2 * VISUAL_FRAME_BYTES} bytes"),
    ({"raw_audio": b"\0\0\0"},
     "Invalid raw audio size: got 3 bytes, expected a multiple of 4 (float32 samples)"),
    ({"raw_audio": b"\0"}, "Invalid raw audio size: got 1 bytes, expected a multiple of 4 (float32 samples)"),
    ({"raw_audio": np.array([0.1, np.nan], np.float32).tobytes()}, "raw_audio contains NaN or Inf values"),
    ({"raw_audio": np.array([np.inf] * 4, np.float32).tobytes()}, "raw_audio contains NaN or Inf values"),
    ({"raw_audio": b"", "audio_features": b"\0" * 100},
     "Invalid audio features size: got 100 bytes, expected 32768 bytes"),
    ({"raw_audio": b""}, "Either raw_audio or audio_features must be provided"),
    ({"sample_rate": 100}, "sample_rate must be 8000-192000 Hz, got 100"),
    ({"model_id": "nobody"}, "Model 'nobody' not found in configuration"),
    ({"start_frame_idx": -1}, "start_frame_idx must be >= 0, got -1"),
])
def test_bad_requests_get_the_clear_error(stub, server, fields: dict, error: str) -> None:
    """Each bad input gets its error string (the original's where it has one), success=false."""
    resp = stub.InferBatchComposite(request(server, 2, 0, **fields), timeout=60)
    assert not resp.success
    assert resp.error == error
    assert len(resp.composited_frames) == 0


def test_audio_alone_gives_the_same_frames_as_client_built_input(stub, server) -> None:
    """Empty visual_frames: the server builds the input from the avatar, byte-identical JPEGs."""
    client_built = request(server, 5, 123)
    server_built = request(server, 5, 123, visual_frames=b"")
    a = stub.InferBatchComposite(client_built, timeout=60)
    b = stub.InferBatchComposite(server_built, timeout=60)
    assert a.success and b.success, (a.error, b.error)
    assert list(a.composited_frames) == list(b.composited_frames)


def test_nan_visual_frames_are_rejected(stub, server) -> None:
    """NaN or Inf in visual_frames is a clear error, not garbage frames."""
    visual = np.full((1, 6, 320, 320), 0.5, np.float32)
    visual[0, 3, 100, 100] = np.nan
    resp = stub.InferBatchComposite(request(server, 1, 0, visual_frames=visual.tobytes()), timeout=60)
    assert (resp.success, resp.error) == (False, "visual_frames contains NaN or Inf values")


def test_deprecated_audio_features_path(stub, server, oracle) -> None:
    """32768 bytes of features, replicated to every frame, give frames with audio time 0."""
    resp = stub.InferBatchComposite(
        request(server, 3, 7, raw_audio=b"",
                audio_features=np.full(8192, 0.3, np.float32).tobytes()), timeout=60)
    assert resp.success, resp.error
    assert resp.audio_processing_ms < 5
    assert [oracle.frame(j) for j in resp.composited_frames] == [7, 8, 9]


def test_other_sample_rates_are_resampled(stub, server) -> None:
    """48 kHz audio is accepted and gives the same frame count."""
    audio = speech_like_audio(19 * 0.04, sample_rate=48000)
    resp = stub.InferBatchComposite(
        request(server, 4, 0, raw_audio=audio.tobytes(), sample_rate=48000), timeout=60)
    assert resp.success, resp.error
    assert len(resp.composited_frames) == 4


def test_the_server_survives_every_bad_request(stub) -> None:
    """After all the bad inputs, the server is still healthy with every role alive."""
    health = stub.Health(pb.HealthRequest(), timeout=5)
    assert health.healthy
    assert list(health.gpu_ids) == [0]
    assert health.max_models == 40


def test_concurrent_clients_each_get_their_own_frames(server, oracle) -> None:
    """8 concurrent clients x 5 requests with different start indices: no mixed-up frames."""
    base = request(server, 4, 0)

    def client(c: int) -> list[tuple[int, list[int]]]:
        out = []
        with channel(server.address) as ch:
            s = pb_grpc.MonolithicServiceStub(ch)
            for r in range(5):
                start = 31 * c + 7 * r
                req = pb.CompositeBatchRequest()
                req.CopyFrom(base)
                req.start_frame_idx = start
                resp = s.InferBatchComposite(req, timeout=120)
                assert resp.success, resp.error
                out.append((start, [oracle.frame(j) for j in resp.composited_frames]))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [x for r in pool.map(client, range(8)) for x in r]
    assert len(results) == 40
    for start, frames in results:
        assert frames == [(start + i) % FRAMES for i in range(4)]


def test_model_management_rpcs(stub, server) -> None:
    """ListModels lists every configured model; Load/Unload change state; stats count requests."""
    listed = {m.model_id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models}
    assert set(listed) == {"demo", "other"}
    assert listed["demo"].loaded and listed["demo"].gpu_id == 0 and listed["demo"].memory_mb > 0
    assert not listed["other"].loaded and listed["other"].gpu_id == -1

    before = {m.model_id: m for m in stub.GetModelStats(pb.GetModelStatsRequest(), timeout=5).models}
    resp = stub.InferBatchComposite(request(server, 2, 0), timeout=60)
    assert resp.success
    after = {m.model_id: m for m in stub.GetModelStats(pb.GetModelStatsRequest(), timeout=5).models}
    assert after["demo"].request_count == before["demo"].request_count + 1
    assert after["demo"].last_used_timestamp >= int(time.time()) - 5
    assert after["demo"].avg_inference_ms > 0

    load = stub.LoadModel(pb.LoadModelRequest(model_id="other", preferred_gpu=-1), timeout=60)
    assert load.success, load.error
    assert load.gpu_id == 0 and load.load_time_ms > 0
    assert stub.Health(pb.HealthRequest(), timeout=5).loaded_models == 2

    unload = stub.UnloadModel(pb.UnloadModelRequest(model_id="other"), timeout=60)
    assert unload.success, unload.error
    again = stub.UnloadModel(pb.UnloadModelRequest(model_id="other"), timeout=60)
    assert (again.success, again.error) == (False, "Failed to unload model: model 'other' not loaded")
    unknown = stub.LoadModel(pb.LoadModelRequest(model_id="nobody"), timeout=5)
    assert (unknown.success, unknown.error) == (False, "Failed to load model: model 'nobody' not configured")


def test_on_demand_load_sets_model_loaded(stub, server) -> None:
    """A request for an unloaded model loads it and says so in model_loaded/model_load_time_ms."""
    stub.UnloadModel(pb.UnloadModelRequest(model_id="other"), timeout=60)
    req = request(server, 2, 0, model_id="other")
    first = stub.InferBatchComposite(req, timeout=120)
    assert first.success, first.error
    assert first.model_loaded and first.model_load_time_ms > 0
    second = stub.InferBatchComposite(req, timeout=60)
    assert second.success and not second.model_loaded and second.model_load_time_ms == 0


def test_sigterm_stops_everything_and_leaks_nothing(tmp_path: Path, small_models_root: Path) -> None:
    """SIGTERM: exit 0 within 10 s, no child process and no /dev/shm segment left."""
    config = write_config(tmp_path / "config.yaml", small_models_root)
    instance = yaml.safe_load(config.read_text())["runtime"]["instance"]
    srv = ServerProcess(config, log_path=tmp_path / "server.log")
    srv.start()
    try:
        with channel(srv.address) as ch:
            resp = pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(
                build_request(config, "demo", 2, 0), timeout=60)
            assert resp.success, resp.error
        children = child_pids(srv.proc.pid)
        assert len(children) >= 4  # frontend, gpu_worker, 2 compositors
        assert list_segments(instance)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(10) == 0
        assert time.monotonic() - t0 < 10
    finally:
        srv.stop()
    alive = [p for p in children if Path(f"/proc/{p}").exists()]
    assert alive == []
    assert list_segments(instance) == []


def test_sigint_stops_everything(tmp_path: Path, small_models_root: Path) -> None:
    """SIGINT (Ctrl-C) stops the server the same way."""
    config = write_config(tmp_path / "config.yaml", small_models_root)
    instance = yaml.safe_load(config.read_text())["runtime"]["instance"]
    srv = ServerProcess(config, log_path=tmp_path / "server.log")
    srv.start()
    children = child_pids(srv.proc.pid)
    os.kill(srv.proc.pid, signal.SIGINT)
    assert srv.proc.wait(10) == 0
    srv.stop()
    assert [p for p in children if Path(f"/proc/{p}").exists()] == []
    assert list_segments(instance) == []


def test_a_killed_gpu_worker_is_restarted_and_serves_again(tmp_path: Path,
                                                          small_models_root: Path) -> None:
    """SIGKILL of the gpu_worker: the supervisor restarts it and requests succeed again."""
    config = write_config(tmp_path / "config.yaml", small_models_root)
    with ServerProcess(config, log_path=tmp_path / "server.log") as srv, channel(srv.address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        req = build_request(config, "demo", 2, 0)
        assert stub.InferBatchComposite(req, timeout=60).success
        worker = role_pids(srv.proc.pid, "gpu_worker")[0]
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 60
        resp = None
        while time.monotonic() < deadline:
            try:
                resp = stub.InferBatchComposite(req, timeout=60)
            except grpc.RpcError as exc:  # UNAVAILABLE while the worker is down
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                time.sleep(0.2)
                continue
            if resp.success:
                break
            time.sleep(0.2)
        assert resp is not None and resp.success, resp
        assert resp.model_loaded  # the new worker loaded the model on demand
        assert stub.Health(pb.HealthRequest(), timeout=5).healthy


@pytest.mark.parametrize("batch", [1, 5, 16, 23, 32])
def test_every_audio_length_with_every_batch_size_gives_frames(stub, batch: int) -> None:
    """Audio from 1 sample to 10 s with batch sizes up to 32: B frames every time, no crash."""
    for samples in (1, 199, 3200, 10240, 25600, 160000):
        audio = speech_like_audio(samples / 16000)[:samples]
        assert audio.size == samples
        resp = stub.InferBatchComposite(pb.CompositeBatchRequest(
            model_id="demo", raw_audio=audio.tobytes(), batch_size=batch, start_frame_idx=3),
            timeout=120)
        assert resp.success, (samples, resp.error)
        assert len(resp.composited_frames) == batch
    assert stub.Health(pb.HealthRequest(), timeout=5).healthy
