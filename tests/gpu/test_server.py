"""The server on the device: memory figures, load/unload cycles, coalesced runs, batch 32."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.bench.grpc_load import load_cycles
from pipeline.bench.local_server import ServerProcess
from pipeline.client import build_request, channel, speech_like_audio
from pipeline.gpu_worker.precision import psnr_db
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc
from tests.gpu.support import BACKGROUNDS, SIZES, decode, reference_frames, requires_gpu

pytestmark = requires_gpu
MEMORY_TOLERANCE_MB = 64
SAME_FRAME_DB = 45.0  # fp32 on another provider or in another batch: rounding, not content


def _stub(server: ServerProcess) -> tuple[object, pb_grpc.MonolithicServiceStub]:
    ch = channel(server.address)
    return ch, pb_grpc.MonolithicServiceStub(ch)


def _request(config: Path, batch: int, start: int, seed: int) -> pb.CompositeBatchRequest:
    req = build_request(config, "bench", batch, start, client_visual=False)
    req.raw_audio = speech_like_audio((batch + 15) * 0.04, seed=seed).tobytes()
    return req


def test_health_and_listmodels_report_measured_device_memory(
        gpu_server: ServerProcess, provider: str, record_property: pytest.RecordProperty) -> None:
    """Health reports the device memory NVML reads; ListModels a loaded model's measured memory."""
    ch, stub = _stub(gpu_server)
    with ch:
        time.sleep(0.6)  # one heartbeat after whatever ran before
        health = stub.Health(pb.HealthRequest(), timeout=10)
        models = {m.model_id: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    used_mb = health.gpu_memory_used_gb[0] * 1024
    record_property("health_memory_used_mb", round(used_mb, 1))
    record_property("bench_memory_mb", models["bench"].memory_mb)
    assert health.healthy and list(health.gpu_ids) == [0]
    assert models["bench"].state == pb.MODEL_STATE_READY and models["bench"].gpu_id == 0
    backgrounds_mb = BACKGROUNDS * 1280 * 720 * 3 / 2**20
    assert models["bench"].memory_mb > backgrounds_mb  # plus measured session memory
    if provider == "cuda":
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            pynvml.nvmlShutdown()
        record_property("nvml_memory_used_mb", round(info.used / 2**20, 1))
        assert 0 < used_mb <= info.total / 2**20
        assert abs(used_mb - info.used / 2**20) <= MEMORY_TOLERANCE_MB
    else:
        assert used_mb > 0  # the worker's private RSS on a CPU worker


def test_load_unload_cycles_return_device_memory_to_its_baseline(
        gpu_server: ServerProcess, provider: str, record_property: pytest.RecordProperty) -> None:
    """After the LoadModel/UnloadModel cycles the device memory is back at its baseline +- 64 MB."""
    result = load_cycles(gpu_server.address, "cycle", SIZES.cycles, 0)
    growth_mb = (result["memory_gb_after_last_unload"] - result["memory_gb_baseline"]) * 1024
    for key in ("cycles", "load_ms_p50", "unload_ms_p50", "memory_gb_baseline",
                "memory_gb_loaded_last", "memory_gb_after_last_unload", "last_model_memory_mb"):
        record_property(key, result[key])
    record_property("growth_mb", round(growth_mb, 1))
    assert result["cycles"] == SIZES.cycles
    assert result["memory_gb_loaded_last"] > result["memory_gb_baseline"]  # a load is seen
    assert growth_mb <= MEMORY_TOLERANCE_MB, result  # nothing leaks
    if provider == "cuda":  # on a CPU worker the figure is RSS, which an unload's heap trim
        assert growth_mb >= -MEMORY_TOLERANCE_MB, result  # lowers below it: one-sided there


def test_coalesced_runs_equal_separate_runs(gpu_server: ServerProcess, gpu_config: Path,
                                            record_property: pytest.RecordProperty) -> None:
    """Requests sent together share UNet runs, and their frames equal those of each sent alone."""
    requests = [_request(gpu_config, batch, start=17 * i, seed=i + 1)
                for i, batch in enumerate(SIZES.coalesced)]
    together: list[pb.CompositeBatchResponse | None] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def send(i: int) -> None:
        ch, stub = _stub(gpu_server)
        with ch:
            stub.Health(pb.HealthRequest(), timeout=30)  # connected before the barrier
            barrier.wait()
            together[i] = stub.InferBatchComposite(requests[i], timeout=120)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ch, stub = _stub(gpu_server)
    with ch:
        alone = [stub.InferBatchComposite(r, timeout=120) for r in requests]
    for resp in [*together, *alone]:
        assert resp is not None and resp.success, resp and resp.error
    runs = [r.stages.run_requests for r in together]  # type: ignore[union-attr]
    record_property("run_requests_together", runs)
    assert max(runs) > 1, runs
    assert [r.stages.run_requests for r in alone] == [1] * len(requests)
    worst = min(psnr_db(decode(a), decode(b))
                for t, s in zip(together, alone, strict=True)
                for a, b in zip(t.composited_frames, s.composited_frames, strict=True))  # type: ignore[union-attr]
    record_property("worst_frame_psnr_db", round(min(worst, 200.0), 2))
    assert worst >= SAME_FRAME_DB
    assert [len(r.composited_frames) for r in together] == list(SIZES.coalesced)  # type: ignore[union-attr]


def test_a_batch_of_32_end_to_end_matches_the_cpu(
        gpu_server: ServerProcess, gpu_config: Path, record_property: pytest.RecordProperty) -> None:
    """A batch-32 request through the server gives 32 1280x720 frames that equal the CPU's."""
    req = _request(gpu_config, SIZES.batch, start=5, seed=32)
    ch, stub = _stub(gpu_server)
    with ch:
        resp = stub.InferBatchComposite(req, timeout=120)
    assert resp.success, resp.error
    assert len(resp.composited_frames) == SIZES.batch and resp.stages.run_frames == SIZES.batch
    expected = reference_frames(gpu_config, "bench", req.raw_audio, SIZES.batch, start=5)
    got = [decode(jpeg) for jpeg in resp.composited_frames]
    assert all(frame.shape == (720, 1280, 3) for frame in got)
    worst = min(psnr_db(e, g) for e, g in zip(expected, got, strict=True))
    for key in ("unet_ms", "paste_ms", "jpeg_ms", "composite_critical_ms"):
        record_property(key, round(getattr(resp.stages, key), 2))
    record_property("total_time_ms", round(resp.total_time_ms, 2))
    record_property("worst_frame_psnr_db", round(min(worst, 200.0), 2))
    assert worst >= SAME_FRAME_DB
