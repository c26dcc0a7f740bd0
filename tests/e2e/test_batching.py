"""Dynamic batching in the gpu_worker, on the real server: concurrent requests of one model
share one UNet run (never more than max_batch_frames) and every frame equals the frame the
same request gets when it runs alone."""
from __future__ import annotations

import threading

import pytest

from pipeline.bench.local_server import ServerProcess
from pipeline.client import build_request, channel, speech_like_audio
from pipeline.rpc import monolithic_pb2 as pb
from pipeline.rpc import monolithic_pb2_grpc as pb_grpc

MAX_BATCH_FRAMES = 16
DELAY_MS = 400  # long enough that requests sent together always meet in the worker


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(**{"batching.max_batch_frames": MAX_BATCH_FRAMES,
                           "batching.max_queue_delay_ms": DELAY_MS})


def _requests(server: ServerProcess) -> list[pb.CompositeBatchRequest]:
    """Different batch sizes, start frames, audio; one with the visual input server-built."""
    out = []
    for i, (batch, start) in enumerate([(5, 0), (3, 40), (7, 100), (1, 249), (6, 17)]):
        req = build_request(server.config, "demo", batch, start)  # type: ignore[attr-defined]
        req.raw_audio = speech_like_audio((batch + 15) * 0.04, seed=i + 1).tobytes()
        if i == 2:
            req.visual_frames = b""
        out.append(req)
    return out


def _send_together(address: str, requests: list[pb.CompositeBatchRequest]) -> list[pb.CompositeBatchResponse]:
    responses: list[pb.CompositeBatchResponse | None] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def client(i: int) -> None:
        with channel(address) as ch:
            stub = pb_grpc.MonolithicServiceStub(ch)
            stub.Health(pb.HealthRequest(), timeout=30)  # connected before the barrier
            barrier.wait()
            responses[i] = stub.InferBatchComposite(requests[i], timeout=120)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return responses  # type: ignore[return-value]


def test_coalesced_frames_equal_unbatched_frames(server: ServerProcess) -> None:
    requests = _requests(server)
    together = _send_together(server.address, requests)
    with channel(server.address) as ch:
        stub = pb_grpc.MonolithicServiceStub(ch)
        alone = [stub.InferBatchComposite(r, timeout=120) for r in requests]

    for resp in together + alone:
        assert resp.success, resp.error
    # alone, each request had its own run (nothing else was queued in the delay)
    assert [(r.stages.run_requests, r.stages.run_frames) for r in alone] == \
        [(1, req.batch_size) for req in requests]
    # together, they were coalesced, and no run exceeded max_batch_frames
    runs = [(r.stages.run_requests, r.stages.run_frames) for r in together]
    assert max(n for n, _ in runs) > 1, runs
    assert all(frames <= MAX_BATCH_FRAMES for _, frames in runs), runs
    assert sum(n == 1 for n, _ in runs) < len(runs)
    # and the frames are the same bytes either way, in their own request, in order
    for req, batched, single in zip(requests, together, alone, strict=True):
        assert len(batched.composited_frames) == req.batch_size
        assert list(batched.composited_frames) == list(single.composited_frames)
