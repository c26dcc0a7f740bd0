"""The gRPC load of `lipsync bench`: C concurrent clients of InferBatchComposite, what they
measured (latency, the server's stage timings, the CPU of every process), one request at a
time, and model load/unload cycles."""
from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from pipeline.bench.figures import percentile, role_cpu_seconds
from pipeline.client import channel
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc

INFER_METHOD = "/monolithic.MonolithicService/InferBatchComposite"
STAGES = ("queue", "input_copy", "audio", "encoder", "visual", "unet", "paste", "jpeg",
          "composite_critical")


def _stages(resp: pb.CompositeBatchResponse) -> dict[str, float]:
    """The server's per-stage ms of one response, plus its critical-path compute."""
    st = resp.stages
    stages = {name: getattr(st, f"{name}_ms") for name in STAGES}
    # what the request needed computed, in order: features, visual input, the UNet run,
    # then the busiest compositor's paste + JPEG; everything else is the pipeline's cost
    stages["compute"] = st.audio_ms + st.visual_ms + st.unet_ms + st.composite_critical_ms
    stages["server_total"] = resp.total_time_ms
    stages["run_frames"] = st.run_frames
    return stages


@dataclass
class Measured:
    """What the clients saw over one measured stretch of requests."""

    wall_s: float = 0.0
    frames: int = 0
    latencies: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process

    def add(self, other: Measured) -> Measured:
        cpu = {k: self.cpu_s.get(k, 0.0) + other.cpu_s.get(k, 0.0)
               for k in {*self.cpu_s, *other.cpu_s}}
        return Measured(self.wall_s + other.wall_s, self.frames + other.frames,
                        self.latencies + other.latencies, self.stages + other.stages,
                        self.errors + other.errors, cpu)

    def summary(self, batch: int, concurrency: int) -> dict[str, Any]:
        stages, lat = self.stages, self.latencies
        overheads = [t - s["compute"] for t, s in zip(lat, stages, strict=True)]
        return {
            "batch": batch, "concurrency": concurrency, "requests": len(lat),
            "errors": len(self.errors), "first_error": self.errors[0] if self.errors else "",
            "wall_s": round(self.wall_s, 3),
            "fps": round(self.frames / self.wall_s, 2) if self.wall_s else 0.0,
            "p50_ms": round(percentile(lat, 50), 2), "p95_ms": round(percentile(lat, 95), 2),
            "p99_ms": round(percentile(lat, 99), 2),
            "stage_ms": {k: round(statistics.fmean(s[k] for s in stages), 2) if stages else 0.0
                         for k in (*STAGES, "compute", "server_total")},
            "mean_run_frames": round(statistics.fmean(s["run_frames"] for s in stages), 2)
            if stages else 0.0,
            "overhead_ms_p50": round(percentile(overheads, 50), 2),
            # where the CPU went: ms of CPU per request, per process (and all together)
            "cpu_ms_per_request": {
                role: round(sec * 1e3 / len(lat), 2) for role, sec in
                sorted({**self.cpu_s, "total": sum(self.cpu_s.values())}.items())}
            if lat else {},
        }


def _call(call: Callable[..., Any], wire: bytes) -> tuple[Any, str]:
    """One call: (the response, "") or, refused with a gRPC status (RESOURCE_EXHAUSTED for
    an overloaded server, UNAVAILABLE, ...), (None, "CODE: details") counted as an error."""
    try:
        return call(wire, timeout=300), ""
    except grpc.RpcError as exc:
        return None, f"{exc.code().name}: {exc.details()}"


class Clients:
    """`concurrency` gRPC clients of one server, each on its own channel, sending one
    request (serialized once: the client's protobuf encoding is not what is measured).
    Given one request per model, client i sends the (i mod n)-th: behind a balancer that
    spreads the load over the boxes the models hash to."""

    def __init__(self, address: str,
                 request: pb.CompositeBatchRequest | Sequence[pb.CompositeBatchRequest],
                 concurrency: int, warmup: int, ops_endpoint: str | None = None) -> None:
        self.ops_endpoint = ops_endpoint
        pool_of = [request] if isinstance(request, pb.CompositeBatchRequest) else list(request)
        mine = [pool_of[i % len(pool_of)] for i in range(concurrency)]
        self.batch = mine[0].batch_size
        self.wire = mine[0].SerializeToString()
        self.wires = [self.wire if r is mine[0] else r.SerializeToString() for r in mine]
        # the bytes carry no readable model_id: the channel names it (x-model-id)
        self.channels = [channel(address, r.model_id) for r in mine]
        self.calls = [ch.unary_unary(INFER_METHOD,
                                     response_deserializer=pb.CompositeBatchResponse.FromString)
                      for ch in self.channels]
        self.closed = False
        with ThreadPoolExecutor(concurrency) as pool:  # a refusal here is no measurement
            list(pool.map(lambda cw: [_call(cw[0], cw[1]) for _ in range(warmup)],
                          zip(self.calls, self.wires, strict=True)))

    def close(self) -> None:
        self.closed = True  # the clients still sending stop (Ctrl-C, SIGTERM mid-run)
        for ch in self.channels:
            ch.close()

    def run(self, requests: int | None, duration: float | None, pause_s: float = 0.0) -> Measured:
        """Every client sends until `requests` were sent or `duration` seconds passed,
        waiting `pause_s` after each answer (a rate below what the server could take)."""
        out = Measured()
        lock = threading.Lock()
        counter = itertools.count()
        barrier = threading.Barrier(len(self.calls) + 1)
        end = [float("inf")]

        def more() -> bool:
            with lock:
                n = next(counter)
            return (requests is None or n < requests) and time.perf_counter() < end[0] \
                and not self.closed

        def client(call: Callable[..., Any], wire: bytes) -> None:
            barrier.wait()
            while more():
                t0 = time.perf_counter()
                resp, refused = _call(call, wire)
                dt = (time.perf_counter() - t0) * 1e3
                if self.closed:
                    return
                with lock:
                    if resp is None:
                        out.errors.append(refused)
                    elif resp.success:
                        out.latencies.append(dt)
                        out.stages.append(_stages(resp))
                    else:
                        out.errors.append(resp.error)
                if pause_s:
                    time.sleep(pause_s)

        threads = [threading.Thread(target=client, args=cw)
                   for cw in zip(self.calls, self.wires, strict=True)]
        for t in threads:
            t.start()
        cpu_before = role_cpu_seconds(self.ops_endpoint)
        barrier.wait()
        t0 = time.perf_counter()
        if duration is not None:
            end[0] = t0 + duration
        for t in threads:
            t.join()
        out.wall_s = time.perf_counter() - t0
        cpu_after = role_cpu_seconds(self.ops_endpoint)
        out.cpu_s = {role: cpu_after[role] - cpu_before[role]
                     for role in cpu_after if role in cpu_before}
        out.frames = len(out.latencies) * self.batch
        return out


def drive(address: str,
          request: pb.CompositeBatchRequest | Sequence[pb.CompositeBatchRequest],
          concurrency: int, requests: int | None, duration: float | None, warmup: int,
          ops_endpoint: str | None = None) -> dict[str, Any]:
    """`concurrency` clients send `request` (or one of the requests each) until `requests`
    were measured or `duration` seconds passed; the figures of the measured ones."""
    clients = Clients(address, request, concurrency, warmup, ops_endpoint)
    try:
        return clients.run(requests, duration).summary(clients.batch, concurrency)
    finally:
        clients.close()


def single_requests(address: str, request: pb.CompositeBatchRequest, count: int) -> dict[str, Any]:
    """`count` requests one at a time: latency, the stage compute on its critical path
    (features + visual + UNet + the busiest compositor) and the rest, the overhead (p50)."""
    result = drive(address, request, 1, count, None, warmup=1)
    return {"requests": result["requests"], "latency_ms_p50": result["p50_ms"],
            "compute_ms_mean": result["stage_ms"]["compute"],
            "overhead_ms_p50": result["overhead_ms_p50"]}


def load_cycles(address: str, model_id: str, cycles: int, gpu: int) -> dict[str, Any]:
    """LoadModel/UnloadModel `cycles` times on one device; load/unload times and that
    device's memory (Health: NVML on a GPU, the worker's private RSS on CPU) per cycle."""
    with channel(address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        stub.UnloadModel(pb.UnloadModelRequest(model_id=model_id), timeout=120)

        def memory_gb() -> float:
            time.sleep(0.6)  # one heartbeat: the figure is fresh
            return stub.Health(pb.HealthRequest(), timeout=10).gpu_memory_used_gb[gpu]

        baseline = memory_gb()
        loads, unloads, after = [], [], []
        for _ in range(cycles):
            resp = stub.LoadModel(pb.LoadModelRequest(model_id=model_id, preferred_gpu=gpu),
                                  timeout=120)
            if not resp.success:
                raise SystemExit(f"lipsync bench: LoadModel failed: {resp.error}")
            loads.append(resp.load_time_ms)
            loaded = memory_gb()
            model_mb = next(m.memory_mb for m in stub.ListModels(pb.ListModelsRequest()).models
                            if m.model_id == model_id)
            t0 = time.perf_counter()
            if not stub.UnloadModel(pb.UnloadModelRequest(model_id=model_id), timeout=120).success:
                raise SystemExit("lipsync bench: UnloadModel failed")
            unloads.append((time.perf_counter() - t0) * 1e3)
            after.append(memory_gb())
    return {
        "model": model_id, "gpu": gpu, "cycles": cycles,
        "load_ms_p50": round(percentile(loads, 50), 1), "load_ms_max": round(max(loads), 1),
        "unload_ms_p50": round(percentile(unloads, 50), 1),
        "memory_gb_baseline": round(baseline, 4), "memory_gb_loaded_last": round(loaded, 4),
        "memory_gb_after_first_unload": round(after[0], 4),
        "memory_gb_after_last_unload": round(after[-1], 4),
        "memory_growth_mb_over_cycles": round((after[-1] - after[0]) * 1024, 1),
        "memory_gb_after_unload_every_10": [round(a, 4) for a in after[::10]],
        "last_model_memory_mb": model_mb,
    }
