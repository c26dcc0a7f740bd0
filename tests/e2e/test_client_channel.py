"""Our clients' channel against a real gRPC server of the MonolithicService that records
what arrives: the x-model-id header of every client of ours, and the retry policy."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from pipeline.bench.grpc_load import drive
from pipeline.cli.render import RenderError, render_wav
from pipeline.client import MODEL_ID_HEADER, channel
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc


class Recorder(pb_grpc.MonolithicServiceServicer):
    """Answers InferBatchComposite (UNAVAILABLE for the first `refuse` attempts), Health and
    LoadModel; ends StreamAudio at once; records each call's method and metadata."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.refuse = 0
        self.lock = threading.Lock()

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls.append((method, dict(context.invocation_metadata())))

    def InferBatchComposite(self, request, context):  # type: ignore[no-untyped-def]
        self._record("InferBatchComposite", context)
        with self.lock:
            refuse, self.refuse = self.refuse > 0, max(0, self.refuse - 1)
        if refuse:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return pb.CompositeBatchResponse(success=True, composited_frames=[b"jpeg"])

    def Health(self, request, context):  # type: ignore[no-untyped-def]
        self._record("Health", context)
        return pb.HealthResponse(healthy=True)

    def LoadModel(self, request, context):  # type: ignore[no-untyped-def]
        self._record("LoadModel", context)
        return pb.LoadModelResponse(success=True)

    def StreamAudio(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self._record("StreamAudio", context)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "recorded")

    def headers(self, method: str) -> list[str | None]:
        return [md.get(MODEL_ID_HEADER) for m, md in self.calls if m == method]


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    servicer = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(8),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_MonolithicServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_every_call_naming_a_model_carries_it_as_x_model_id(recorder) -> None:
    """The request's model_id becomes the header; a call naming no model sends none."""
    servicer, address = recorder
    with channel(address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        anna = pb.CompositeBatchRequest(model_id="anna")
        assert stub.InferBatchComposite(anna, timeout=5).success
        assert stub.LoadModel(pb.LoadModelRequest(model_id="ben"), timeout=5).success
        assert stub.Health(pb.HealthRequest(), timeout=5).healthy
        stub.InferBatchComposite(anna, timeout=5, metadata=((MODEL_ID_HEADER, "chosen"),))
    assert servicer.headers("InferBatchComposite") == ["anna", "chosen"]
    assert servicer.headers("LoadModel") == ["ben"]
    assert servicer.headers("Health") == [None]


def test_bench_clients_name_the_model_of_their_preserialized_requests(recorder) -> None:
    """`lipsync bench` sends bytes, not messages: its channels carry the model instead;
    with several models (--model a,b) its clients take turns."""
    servicer, address = recorder
    request = pb.CompositeBatchRequest(model_id="carla", batch_size=1, raw_audio=b"\0" * 64)
    result = drive(address, request, concurrency=2, requests=4, duration=None, warmup=1)
    assert result["requests"] == 4 and result["errors"] == 0
    assert servicer.headers("InferBatchComposite") == ["carla"] * 6
    servicer.calls.clear()
    other = pb.CompositeBatchRequest(model_id="dev", batch_size=1, raw_audio=b"\0" * 64)
    result = drive(address, [request, other], concurrency=4, requests=8, duration=None,
                         warmup=1)
    assert result["requests"] == 8 and result["errors"] == 0
    headers = servicer.headers("InferBatchComposite")  # two clients each, one warm-up each
    assert len(headers) == 12 and headers.count("carla") >= 2 and headers.count("dev") >= 2
    assert set(headers) == {"carla", "dev"}


def test_render_names_its_model_on_the_stream(recorder, tmp_path: Path) -> None:
    """`lipsync render --model M` opens StreamAudio with x-model-id M."""
    import soundfile as sf

    servicer, address = recorder
    wav = tmp_path / "speech.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    with pytest.raises(RenderError):
        render_wav(wav, tmp_path / "out.mp4", address, model_id="dev", progress=False)
    assert servicer.headers("StreamAudio") == ["dev"]


def test_unavailable_is_retried_with_backoff_and_bounded(recorder) -> None:
    """UNAVAILABLE is retried (a 1 MiB request too: gRPC keeps it for the retry), up to 5
    attempts spaced ~0.2, 0.4, 0.8, 1.6 s; a channel without the policy fails at once."""
    servicer, address = recorder
    request = pb.CompositeBatchRequest(model_id="emil", raw_audio=b"\0" * (1 << 20))
    servicer.refuse = 2
    with channel(address) as ch:
        assert pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(request, timeout=20).success
    attempts = [md.get("grpc-previous-rpc-attempts") for _, md in servicer.calls]
    assert attempts == [None, "1", "2"]

    servicer.calls.clear()
    servicer.refuse = 100
    t0 = time.monotonic()
    with channel(address) as ch, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(request, timeout=20)
    elapsed = time.monotonic() - t0
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.calls) == 5
    assert 0.8 * 3.0 <= elapsed < 6.0, elapsed  # the backoffs add up to 3 s +- 20 %

    servicer.calls.clear()
    with grpc.insecure_channel(address) as plain, pytest.raises(grpc.RpcError):
        pb_grpc.MonolithicServiceStub(plain).InferBatchComposite(request, timeout=20)
    assert len(servicer.calls) == 1

    servicer.calls.clear()  # ours, asked not to retry (tests that watch a failing server)
    with channel(address, retries=False) as ch, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.MonolithicServiceStub(ch).InferBatchComposite(request, timeout=20)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and len(servicer.calls) == 1
    assert servicer.headers("InferBatchComposite") == ["emil"]
