"""monolithic.MonolithicService: the six RPCs of the original server, wire-compatible.

Application errors come back as success=false + error (as the original did); overload
and a dead worker as gRPC status codes, so clients can retry those.
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from pipeline.config import Config
from pipeline.frontend.errors import Failed, Overloaded, Unavailable
from pipeline.frontend.liveness import Liveness
from pipeline.frontend.metrics import Metrics
from pipeline.frontend.models import ModelRegistry
from pipeline.frontend.router import Router
from pipeline.frontend.streaming.grpc_stream import StreamRpc
from pipeline.frontend.validation import InvalidRequest, validate
from pipeline.frontend.wire import CompositeRequestView
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


STATES = {"unloaded": pb.MODEL_STATE_UNLOADED, "loading": pb.MODEL_STATE_LOADING,
          "ready": pb.MODEL_STATE_READY, "failed": pb.MODEL_STATE_FAILED,
          "unloading": pb.MODEL_STATE_UNLOADING}


class MonolithicService(pb_grpc.MonolithicServiceServicer):
    def __init__(self, cfg: Config, router: Router, registry: ModelRegistry, liveness: Liveness,
                 metrics: Metrics, streams: StreamRpc) -> None:
        self.cfg = cfg
        self.router = router
        self.models = registry
        self.liveness = liveness
        self.metrics = metrics
        self.streams = streams

    async def StreamAudio(self, request_iterator: AsyncIterator[pb.StreamAudioRequest],
                          context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[pb.StreamAudioResponse]:
        # grpc.aio recognises a streaming handler by it being an async generator itself
        async for response in self.streams.stream_audio(request_iterator, context):
            yield response

    async def InferBatchComposite(self, request: CompositeRequestView,
                                  context: grpc.aio.ServicerContext) -> pb.CompositeBatchResponse:
        t0 = time.perf_counter_ns()
        try:
            valid = validate(request, self.cfg)
            result, lease = await self.router.infer(valid, self.cfg.server.request_timeout_s)
        except InvalidRequest as exc:
            self.metrics.request_failed("invalid")
            return pb.CompositeBatchResponse(success=False, error=str(exc), gpu_id=-1)
        except Failed as exc:
            return pb.CompositeBatchResponse(success=False, error=str(exc), gpu_id=-1)
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request not answered within {self.cfg.server.request_timeout_s} s")
        done = result.done
        return pb.CompositeBatchResponse(
            composited_frames=result.frames,
            inference_time_ms=done.inference_ns / 1e6,
            composite_time_ms=result.composite_ns / 1e6,
            total_time_ms=(time.perf_counter_ns() - t0) / 1e6,
            audio_processing_ms=done.audio_ns / 1e6,
            model_loaded=lease.loaded_now,
            model_load_time_ms=lease.load_ns / 1e6,
            success=True,
            gpu_id=done.gpu_id,
            stages=pb.StageTimings(
                queue_ms=done.queue_ns / 1e6, audio_ms=done.audio_ns / 1e6,
                encoder_ms=done.encoder_ns / 1e6, visual_ms=done.visual_ns / 1e6,
                unet_ms=done.inference_ns / 1e6, paste_ms=result.paste_ns / 1e6,
                jpeg_ms=result.jpeg_ns / 1e6, composite_critical_ms=result.critical_ns / 1e6,
                run_frames=done.run_frames, run_requests=done.run_requests,
                input_copy_ms=result.input_copy_ns / 1e6),
        )

    async def Health(self, request: pb.HealthRequest,
                     context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        workers = self.liveness.snapshot()["gpu_workers"]
        return pb.HealthResponse(
            healthy=self.liveness.healthy(),
            loaded_models=self.models.loaded_count(),
            max_models=self.cfg.capacity.max_models,
            gpu_ids=[w["index"] for w in workers],
            gpu_memory_used_gb=[w["device_memory_used_bytes"] / 2**30 for w in workers],
            backends=[w.get("backend", "") for w in workers],
            precisions=[w.get("precision", "") for w in workers],
        )

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        workers = self.liveness.snapshot()["gpu_workers"]

        def runs(m: Any, key: str) -> str:  # the backend of the worker holding a ready model
            ready = m.state == "ready" and 0 <= m.worker < len(workers)
            return str(workers[m.worker].get(key, "")) if ready else ""

        return pb.ListModelsResponse(models=[
            pb.ModelInfo(model_id=m.model_id, loaded=m.state == "ready", gpu_id=m.worker,
                         memory_mb=m.memory_bytes // 2**20, request_count=m.request_count,
                         avg_inference_ms=_avg_ms(m.total_inference_ns, m.request_count),
                         state=STATES[m.state], error=m.error,
                         backend=runs(m, "backend"), precision=runs(m, "precision"))
            for m in self.models.views()])

    async def GetModelStats(self, request: pb.GetModelStatsRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetModelStatsResponse:
        return pb.GetModelStatsResponse(models=[
            pb.ModelStats(model_id=m.model_id, loaded=m.state == "ready", gpu_id=m.worker,
                          memory_mb=m.memory_bytes // 2**20, request_count=m.request_count,
                          total_inference_ms=m.total_inference_ns // 1_000_000,
                          avg_inference_ms=_avg_ms(m.total_inference_ns, m.request_count),
                          last_used_timestamp=int(m.last_used),
                          state=STATES[m.state], error=m.error)
            for m in self.models.views()])

    async def LoadModel(self, request: pb.LoadModelRequest,
                        context: grpc.aio.ServicerContext) -> pb.LoadModelResponse:
        if not request.model_id:
            return pb.LoadModelResponse(success=False, error="model_id is required", gpu_id=-1)
        if request.model_id not in self.cfg.models:
            return pb.LoadModelResponse(
                success=False, gpu_id=-1,
                error=f"Failed to load model: model '{request.model_id}' not configured")
        preferred = request.preferred_gpu if request.HasField("preferred_gpu") else None
        if preferred is not None and not -1 <= preferred < self.cfg.gpus.count:
            return pb.LoadModelResponse(
                success=False, gpu_id=-1,
                error=f"Failed to load model: preferred_gpu {preferred} is not -1 or a GPU "
                      f"index below {self.cfg.gpus.count}")
        t0 = time.perf_counter_ns()
        try:
            gpu = await self.models.load(request.model_id, preferred)
        except (Failed, Overloaded) as exc:
            error = str(exc)
            if not error.startswith("Failed to load model"):
                error = f"Failed to load model: {error}"
            return pb.LoadModelResponse(success=False, error=error, gpu_id=-1)
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.LoadModelResponse(success=True, gpu_id=gpu,
                                    load_time_ms=(time.perf_counter_ns() - t0) / 1e6)

    async def UnloadModel(self, request: pb.UnloadModelRequest,
                          context: grpc.aio.ServicerContext) -> pb.UnloadModelResponse:
        if not request.model_id:
            return pb.UnloadModelResponse(success=False, error="model_id is required")
        if request.model_id not in self.cfg.models:
            return pb.UnloadModelResponse(
                success=False,
                error=f"Failed to unload model: model '{request.model_id}' not configured")
        try:
            await self.models.unload(request.model_id)
        except Failed as exc:
            return pb.UnloadModelResponse(success=False, error=str(exc))
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return pb.UnloadModelResponse(success=True)


def _avg_ms(total_ns: int, count: int) -> float:
    return total_ns / count / 1e6 if count else 0.0
