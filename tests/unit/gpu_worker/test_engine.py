"""The gpu_worker's Engine in this process: real ONNX Runtime sessions on the demo graphs
(32-frame avatar), a request arena of this process, a list as its outbox and a loader that
runs at once; no sockets, no threads, no other process."""
from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import messages as msg
from pipeline.client import speech_like_audio
from pipeline.config import Config, ModelConfig, load_config
from pipeline.gpu_worker import threads
from pipeline.gpu_worker.batching import Inbox
from pipeline.gpu_worker.device import Resolved
from pipeline.gpu_worker.engine import EVENTS, FRONTEND, JOBS, ConfigMismatch, Engine
from pipeline.gpu_worker.jobs import job_spans
from pipeline.gpu_worker.model_cache import ModelCache, load_finished, unet_rebuilt
from pipeline.protocol import RequestLayout
from pipeline.shm.arena import Arena
from pipeline.shm.segment import SHM_DIR, segment_name
from pipeline.synctalk import PREDICTION_BYTES, VISUAL_SHAPE
from tests.conftest import SMALL_FRAMES, write_config
from tests.helpers import write_silent_encoder

_arenas = itertools.count()
BAD_MODEL = {"model_path": "demo/missing.onnx", "background_dir": "demo/frames",
             "crop_rects_path": "demo/crop_rects.json", "num_frames": SMALL_FRAMES}


class Harness:
    """An Engine, what it emitted, the loads it asked for, and a request arena."""

    def __init__(self, cfg: Config, provider: Resolved = "cpu") -> None:
        self.cfg = cfg
        self.emitted: list[tuple[str, msg.Message]] = []
        self.loads: list[str] = []
        self.rebuilds: list[str] = []
        self.deferred: list[ModelConfig] | None = None  # a list: loads wait for finish_loads()
        self.inbox = Inbox()
        self.cache = ModelCache(cfg, 0, provider)
        self.engine = Engine.create(cfg, 0, provider, self.inbox, self.cache,
                                    lambda target, m: self.emitted.append((target, m)),
                                    self._start_load)
        self.arena = Arena.create(segment_name(cfg.runtime.instance, f"requests{next(_arenas)}"),
                                  256 * 2**20)
        self.next_id = 1

    def _start_load(self, config: ModelConfig, rebuild: bool) -> None:
        if rebuild:
            self.rebuilds.append(config.model_id)
            self.inbox.put(unet_rebuilt(self.cache, config))
            return
        self.loads.append(config.model_id)
        if self.deferred is not None:
            self.deferred.append(config)
        else:
            self.inbox.put(load_finished(self.cache, config))

    def finish_loads(self) -> None:
        for config in self.deferred or ():
            self.inbox.put(load_finished(self.cache, config))
        self.deferred = None

    def close(self) -> None:
        self.engine.close()
        self.arena.close()

    def handle(self, *items: object) -> list[tuple[str, msg.Message]]:
        """Feed `items`, step until the inbox is empty; what was emitted meanwhile."""
        self.emitted.clear()
        for item in items:
            self.inbox.put(item)
        while self.engine.step(0.0):
            pass
        return list(self.emitted)

    def control(self, kind: type, model_id: str) -> msg.ControlReply:
        out = self.handle(kind(self._id(), 0, model_id))
        replies = [m for _, m in out if isinstance(m, msg.ControlReply)]
        assert len(replies) == 1, out
        return replies[0]

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def request(self, batch: int, start: int, seed: int = 1, model_id: str = "demo",
                audio: bool = True, visual: np.ndarray | None = None) -> msg.InferRequest:
        """A request laid out in the arena as the frontend lays one out: audio, and the
        client's `visual` if given (else the worker builds it)."""
        samples = speech_like_audio((batch + 15) * 0.04, seed=seed)
        layout = RequestLayout(batch, samples.nbytes, visual=visual is not None)
        block = self.arena.allocate(layout.nbytes)
        assert block is not None
        refs = layout.refs(block.segment, block.offset)
        for name, values in (("audio", samples), ("visual", visual)):
            if values is not None:
                self.arena.ndarray(refs[name].offset, refs[name].shape, "float32")[...] = values
        return msg.InferRequest(request_id=self._id(), worker_pid=0, model_id=model_id,
                                batch_size=batch, start_frame_idx=start, output=refs["output"],
                                visual=refs.get("visual"), audio=refs["audio"] if audio else None)

    def prediction(self, req: msg.InferRequest) -> np.ndarray:
        return self.arena.ndarray(req.output.offset, req.output.shape, "float32").copy()

    def predictions_alone(self, reqs: list[msg.InferRequest]) -> list[np.ndarray]:
        """Each request's prediction when it runs by itself; its output is cleared after,
        for the run they then share."""
        alone = []
        for req in reqs:
            out = self.handle(req)
            assert [m.run_requests for _, m in out if isinstance(m, msg.InferDone)] == [1]
            alone.append(self.prediction(req))
            self.arena.ndarray(req.output.offset, req.output.shape, "float32")[...] = 0
        return alone


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory, small_models_root: Path) -> Path:
    tmp = tmp_path_factory.mktemp("engine")
    mute = {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
            "crop_rects_path": "demo/crop_rects.json", "num_frames": SMALL_FRAMES,
            "audio_encoder_path": str(write_silent_encoder(tmp / "silent.onnx"))}
    return write_config(tmp / "config.yaml", small_models_root,
                        **{"gpus.intra_op_threads": 1, "models.broken": BAD_MODEL,
                           "models.mute": mute})


@pytest.fixture(scope="module")
def loaded(config_path: Path) -> Iterator[Harness]:
    """One engine with the demo model loaded, shared by the tests that only infer."""
    harness = Harness(load_config(config_path))
    assert harness.control(msg.LoadModel, "demo").ok
    yield harness
    harness.close()


@pytest.fixture
def fresh(config_path: Path) -> Iterator[Harness]:
    """An engine holding no model (for load and unload tests)."""
    harness = Harness(load_config(config_path))
    yield harness
    harness.close()


@pytest.fixture
def coalescing(config_path: Path) -> Iterator[Harness]:
    """An engine with the demo model loaded that runs queued requests together (16 frames
    at most)."""
    cfg = load_config(config_path)
    harness = Harness(dataclasses.replace(
        cfg, batching=dataclasses.replace(cfg.batching, max_batch_frames=16)))
    assert harness.control(msg.LoadModel, "demo").ok
    yield harness
    harness.close()


def test_a_load_runs_elsewhere_and_comes_back_through_the_inbox(fresh: Harness) -> None:
    """LoadModel starts a load (not run by the engine); its LoadFinished, taken from the
    inbox, answers with the measured memory, and heartbeats see the model."""
    fresh.inbox.put(msg.LoadModel(1, 0, "demo"))
    assert fresh.engine.step(0.0)  # the LoadModel: the load is started, nothing answered
    assert fresh.loads == ["demo"] and fresh.emitted == []
    assert fresh.engine.step(0.0)  # the LoadFinished
    ((target, reply),) = fresh.emitted
    assert target == FRONTEND and isinstance(reply, msg.ControlReply)
    assert reply.ok and reply.gpu_id == 0 and reply.memory_bytes > 0 and reply.elapsed_ns > 0
    assert fresh.cache.loaded == {"demo": reply.memory_bytes}
    again = fresh.control(msg.LoadModel, "demo")  # loaded: answered at once, no new load
    assert again.ok and fresh.loads == ["demo"]


def test_concurrent_loads_of_a_model_are_one_load(fresh: Harness) -> None:
    """Two LoadModels before the load finished: one load, both answered."""
    out = fresh.handle(msg.LoadModel(1, 0, "demo"), msg.LoadModel(2, 0, "demo"))
    assert fresh.loads == ["demo"]
    assert sorted(m.request_id for _, m in out if isinstance(m, msg.ControlReply) and m.ok) == [1, 2]


def test_a_failed_load_answers_with_the_reason(fresh: Harness) -> None:
    """A model whose UNet is missing: the LoadModel fails with the loader's reason."""
    reply = fresh.control(msg.LoadModel, "broken")
    assert not reply.ok
    assert reply.error.startswith("Failed to load model 'broken': failed to create inferencer")
    assert fresh.cache.loaded == {}


def test_an_unload_during_the_load_drops_the_model(fresh: Harness) -> None:
    """Unloaded while loading: the finished load is dropped, its waiters told so."""
    fresh.deferred = []
    assert fresh.handle(msg.LoadModel(1, 0, "demo")) == []  # the load is under way
    (unload,) = [m for _, m in fresh.handle(msg.UnloadModel(2, 0, "demo"))]
    assert isinstance(unload, msg.ControlReply) and not unload.ok
    assert "not loaded" in unload.error
    fresh.finish_loads()
    (reply,) = [m for _, m in fresh.handle()]
    assert isinstance(reply, msg.ControlReply) and reply.request_id == 1 and not reply.ok
    assert reply.error == "Failed to load model 'demo': the load was cancelled"
    assert fresh.cache.loaded == {} and fresh.cache.get("demo") is None


def test_unload_releases_the_backgrounds(fresh: Harness) -> None:
    """UnloadModel frees the model, tells the compositors to unmap its backgrounds and
    answers; a second unload says it is not loaded."""
    assert fresh.control(msg.LoadModel, "demo").ok
    segment = fresh.cache.models["demo"].avatar.segment.name
    out = fresh.handle(msg.UnloadModel(7, 0, "demo"))
    assert [(t, type(m)) for t, m in out] == [(EVENTS, msg.ReleaseSegment),
                                              (FRONTEND, msg.ControlReply)]
    assert out[0][1] == msg.ReleaseSegment(segment) and out[1][1].ok  # type: ignore[union-attr]
    assert not (SHM_DIR / segment).exists() and fresh.cache.loaded == {}
    again = fresh.control(msg.UnloadModel, "demo")
    assert (again.ok, again.error) == (False, "Failed to unload model: model 'demo' not loaded")


def test_a_model_runs_with_its_own_audio_encoder(fresh: Harness) -> None:
    """A model's own audio_encoder_path gives its features: the same speech opens the demo
    model's mouth, and leaves the reference face as it is on 'mute', whose encoder hears
    only silence."""
    assert fresh.control(msg.LoadModel, "demo").ok and fresh.control(msg.LoadModel, "mute").ok
    demo, mute = fresh.request(2, 0, seed=3), fresh.request(2, 0, seed=3, model_id="mute")
    fresh.handle(demo, mute)
    model = fresh.engine.cache.get("mute")
    assert model is not None and mute.visual is None  # built by the worker, as a client would
    reference = model.avatar.visual_inputs(range(2), np.empty((2, *VISUAL_SHAPE), np.float32))[:, :3]
    np.testing.assert_array_equal(fresh.prediction(mute), np.clip(reference, 0, 1))
    assert np.abs(fresh.prediction(demo) - fresh.prediction(mute)).max() > 0.1


def test_a_model_outside_the_config_is_fatal(fresh: Harness) -> None:
    """A LoadModel for a model this worker's config lacks ends the engine (the frontend
    runs another config): the shell announces the death, the supervisor restarts it."""
    fresh.inbox.put(msg.LoadModel(1, 0, "nobody"))
    with pytest.raises(ConfigMismatch, match="'nobody'"):
        fresh.engine.run(threading.Event())
    assert fresh.loads == []


def test_a_request_for_a_model_not_loaded_fails_at_once(fresh: Harness) -> None:
    """No load on request: it fails with a clear error, and no load is started."""
    req = fresh.request(2, 0)
    out = fresh.handle(req)
    assert out == [(FRONTEND, msg.InferFailed(req.request_id,
                                              "model 'demo' is not loaded on gpu_worker 0"))]
    assert fresh.loads == []


@pytest.mark.parametrize("batch", [1, 4, 11])
def test_a_requests_frames_go_out_as_a_few_jobs_then_its_done(loaded: Harness, batch: int) -> None:
    """The frames as `job_spans` cuts them (one job per compositor, none over JOB_FRAMES),
    each job the prediction rows of the output block and the wrapped background frames and
    rects of its frames, then InferDone with the stage timings; the prediction is written."""
    req = loaded.request(batch, SMALL_FRAMES - 2)
    out = loaded.handle(req)
    jobs = [m for t, m in out if t == JOBS]
    spans = job_spans(batch, loaded.cfg.compositor.pool_size)
    assert [type(m) for _, m in out] == [msg.CompositeJob] * len(spans) + [msg.InferDone]
    assert [len(s) for s in spans] == {1: [1], 4: [2, 2], 11: [4, 4, 3]}[batch]
    avatar = loaded.cache.models["demo"].avatar
    for span, job in zip(spans, jobs, strict=True):
        assert isinstance(job, msg.CompositeJob) and job.predictions is not None
        frames = [(SMALL_FRAMES - 2 + i) % SMALL_FRAMES for i in span]
        assert (job.request_id, job.first_frame) == (req.request_id, span.start)
        assert job.predictions.offset == req.output.offset + span.start * PREDICTION_BYTES
        assert job.predictions.shape == (len(span), 3, 320, 320)
        assert job.backgrounds == tuple(avatar.background_ref(f) for f in frames)
        assert job.rects == tuple(avatar.rect(f) for f in frames)
        assert job.mode == "synctalk" and job.jpeg_quality == loaded.cfg.jpeg_quality
    done = out[-1][1]
    assert isinstance(done, msg.InferDone) and done.request_id == req.request_id
    assert (done.run_frames, done.run_requests, done.gpu_id) == (batch, 1, 0)
    assert done.inference_ns > 0 and done.audio_ns >= done.encoder_ns > 0 and done.visual_ns > 0
    prediction = loaded.prediction(req)
    assert prediction.shape == (batch, 3, 320, 320) and prediction.max() > 0


def test_a_bad_request_fails_alone(loaded: Harness) -> None:
    """A request with neither audio nor features fails with the API's error; the request
    beside it in the inbox is served."""
    bad, good = loaded.request(1, 0, audio=False), loaded.request(1, 1)
    out = loaded.handle(bad, good)
    assert (FRONTEND, msg.InferFailed(bad.request_id,
                                      "Either raw_audio or audio_features must be provided")) in out
    assert any(isinstance(m, msg.InferDone) and m.request_id == good.request_id for _, m in out)


def test_coalesced_requests_share_a_run_and_get_their_own_frames(coalescing: Harness) -> None:
    """With a frame limit of 16, queued requests of one model share one UNet run, and each
    gets the same prediction it gets alone, in its own output block."""
    reqs = [coalescing.request(b, s, seed=i) for i, (b, s) in enumerate([(3, 0), (2, 9), (4, 30)])]
    alone = coalescing.predictions_alone(reqs)
    out = coalescing.handle(*reqs)
    done = [m for _, m in out if isinstance(m, msg.InferDone)]
    assert [(d.run_requests, d.run_frames) for d in done] == [(3, 9)] * 3
    jobs = [m for _, m in out if isinstance(m, msg.CompositeJob)]
    assert sum(len(job.backgrounds) for job in jobs) == 9
    for req, single in zip(reqs, alone, strict=True):
        np.testing.assert_allclose(coalescing.prediction(req), single, atol=1e-5)


def test_a_run_mixing_client_and_built_visual_inputs_gives_each_its_own(
        coalescing: Harness) -> None:
    """One coalesced run of requests whose visual input the worker builds and one whose
    client sent it (here: the very input the worker would build for frames 40..42): each
    gets the prediction it gets alone (two built ones sharing rows would not: the second
    would overwrite the first's input before the run)."""
    model = coalescing.engine.cache.get("demo")
    assert model is not None
    sent = model.avatar.visual_inputs(range(40, 43), np.empty((3, *VISUAL_SHAPE), np.float32))
    reqs = [coalescing.request(2, 0, seed=1), coalescing.request(3, 40, seed=2, visual=sent),
            coalescing.request(4, 20, seed=3)]
    alone = coalescing.predictions_alone(reqs)
    out = coalescing.handle(*reqs)
    assert [(m.run_requests, m.run_frames) for _, m in out
            if isinstance(m, msg.InferDone)] == [(3, 9)] * 3
    for req, single in zip(reqs, alone, strict=True):
        np.testing.assert_allclose(coalescing.prediction(req), single, atol=1e-5)


def test_a_coalesced_run_with_a_failed_request_gives_the_others_their_own(
        coalescing: Harness) -> None:
    """Built visual inputs of a coalesced run go straight into its staging rows; when the
    request between two of them fails (no audio), its rows stay empty and the one after
    it still gets the prediction it gets alone."""
    good = [coalescing.request(2, 0, seed=1), coalescing.request(4, 20, seed=3)]
    alone = coalescing.predictions_alone(good)
    bad = coalescing.request(3, 40, seed=2, audio=False)
    buffer = coalescing.engine.inputs.built_visual  # what the requests alone built into
    kept = buffer.copy()
    out = coalescing.handle(good[0], bad, good[1])
    assert (FRONTEND, msg.InferFailed(bad.request_id,
                                      "Either raw_audio or audio_features must be provided")) in out
    assert [(m.run_requests, m.run_frames) for _, m in out
            if isinstance(m, msg.InferDone)] == [(2, 6)] * 2
    # built in the staging rows: the buffer of single runs neither grew nor was written
    assert coalescing.engine.inputs.built_visual is buffer
    np.testing.assert_array_equal(buffer, kept)
    for req, single in zip(good, alone, strict=True):
        np.testing.assert_allclose(coalescing.prediction(req), single, atol=1e-5)


def test_the_inference_threads_follow_the_measured_stage_cpu(
        tmp_path: Path, small_models_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With gpus.intra_op_threads auto, once enough frames were measured the loaded UNet is
    rebuilt on the loader with the threads the measured CPU per frame calls for (here the
    compositing outweighs the UNet: 1 of 2 cores), the next request runs on it, and it
    answers as before."""
    monkeypatch.setattr(threads, "PLAN_FRAMES", 1)
    harness = Harness(load_config(write_config(tmp_path / "config.yaml", small_models_root)))
    try:
        cache = harness.cache
        cache.planner.cores = cache.planner.threads = 2
        cache.backend = cache.backend.with_threads(2)
        assert not cache.planner.fixed and harness.control(msg.LoadModel, "demo").ok
        before = cache.models["demo"].unet
        assert before.session.get_session_options().intra_op_num_threads == 2  # type: ignore[attr-defined]
        cache.planner.composite(10.0)  # a compositor's job measured far above the UNet's frame
        first = harness.request(2, 0)
        harness.handle(first)
        assert harness.rebuilds == ["demo"] and cache.backend.threads == 1
        after = cache.models["demo"].unet
        assert after is not before
        assert after.session.get_session_options().intra_op_num_threads == 1  # type: ignore[attr-defined]
        again = harness.request(2, 0)
        out = harness.handle(again)
        assert any(isinstance(m, msg.InferDone) for _, m in out)
        assert np.array_equal(harness.prediction(again), harness.prediction(first))
    finally:
        harness.close()


def test_the_engine_runs_on_openvino(config_path: Path) -> None:
    """The same engine on OpenVINO: a request gives its jobs and InferDone, and at fp32 the
    prediction equals ONNX Runtime's within 1e-4."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    cfg = load_config(config_path)
    cfg = dataclasses.replace(cfg, gpus=dataclasses.replace(cfg.gpus, unet_precision="fp32"))
    predictions = []
    for provider in ("cpu", "openvino"):
        harness = Harness(cfg, provider)  # type: ignore[arg-type]
        try:
            assert harness.control(msg.LoadModel, "demo").ok
            req = harness.request(3, 5)
            out = harness.handle(req)
            assert [type(m) for _, m in out] == [msg.CompositeJob] * 2 + [msg.InferDone]
            predictions.append(harness.prediction(req))
            assert harness.cache.backend.runtime == (
                "openvino" if provider == "openvino" else "onnxruntime-cpu")
        finally:
            harness.close()
    assert float(np.max(np.abs(predictions[0] - predictions[1]))) <= 1e-4


def test_with_compositor_device_gpu_the_worker_sends_the_jpegs_itself(
        config_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compositor.device gpu (its CPU test path): a request's frames come out of the engine
    as JPEGs for the frontend, one per frame in order and before the InferDone, equal to the
    compositors' within JPEG loss; no compositor job but the idle frames'."""
    pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec is not installed")
    from pipeline.compositor.composite import paste
    from pipeline.compositor.jpeg_splice import encode_jpeg
    from pipeline.gpu_worker.engine import EncodedFrames
    from pipeline.gpu_worker.precision import psnr_db

    monkeypatch.setenv("LIPSYNC_GPU_TESTS_ON_CPU", "1")
    cfg = load_config(config_path)
    harness = Harness(dataclasses.replace(
        cfg, compositor=dataclasses.replace(cfg.compositor, device="gpu")))
    try:
        assert harness.control(msg.LoadModel, "demo").ok
        model = harness.cache.models["demo"]
        assert model.device_backgrounds is not None
        req = harness.request(3, SMALL_FRAMES - 1)
        out = harness.handle(req)
        assert [(t, type(m)) for t, m in out] == [(FRONTEND, EncodedFrames),
                                                  (FRONTEND, msg.InferDone)]
        prediction = harness.prediction(req)
        encoded = out[0][1]
        assert isinstance(encoded, EncodedFrames) and len(encoded.jpegs) == 3
        header = encoded.header
        assert (header.request_id, header.first_frame) == (req.request_id, 0)
        assert header.compositor == msg.DEVICE_COMPOSITOR and header.paste_ns > 0
        for i, jpeg in enumerate(encoded.jpegs):
            frame = (SMALL_FRAMES - 1 + i) % SMALL_FRAMES
            expected = encode_jpeg(paste(model.avatar.frames()[frame], prediction[i],
                                         model.avatar.rect(frame)), harness.cfg.jpeg_quality)
            decoded = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)
                       for j in (expected, jpeg)]
            assert psnr_db(*decoded) >= 45.0
        idle = harness.handle(msg.BackgroundJpegs(99, 0, "demo", (0, 1)))
        assert [type(m) for _, m in idle] == [msg.CompositeJob] * 2 + [msg.InferDone]
        assert harness.control(msg.UnloadModel, "demo").ok and model.device_backgrounds is None
    finally:
        harness.close()
