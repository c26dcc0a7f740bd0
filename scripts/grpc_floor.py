"""The CPU any Python gRPC frontend pays per InferBatchComposite call, with nothing behind
it (docs/benchmarks.md, "The second redesign step"): the floor under the frontend's figure
in `lipsync bench --compare inprocess`.

    .venv/bin/python scripts/grpc_floor.py --calls 3000 --concurrency 4
    .venv/bin/python scripts/grpc_floor.py --calls 600 --concurrency 4 --rate 43

A grpc.aio server in a process of its own answers every call with the same 8 JPEGs (a demo
background frame encoded at the config's quality, as a response carries them), built once;
the bench's own clients (`pipeline.bench.grpc_load.Clients`) send it the bench's request.
Four servers, one after another:

- `bytes`: the request left as bytes, the response serialized once: grpc.aio's own cost;
- `protobuf`: the request parsed and the response built and serialized by protobuf;
- `frontend`: the frontend's own gRPC layer (its options, the in-flight interceptor, the
  zero-copy request reader, the response built as the servicer builds it);
- `frontend+zmq`: that, and the frontend's ZeroMQ traffic of a batch-8 request: one message
  out (to a peer process standing in for the worker tier, whose CPU is not counted) and
  three back on one PULL socket read from the event loop, as the frontend's inbox is (the
  worker's InferDone, and two compositor jobs' FramesDone of 4 JPEGs each). What is left
  of the frontend's own figure is its own logic: lease, admission, the arena, metrics.

`--rate` spaces the calls (each client waits after an answer) to about that many a second,
as the bench's load arrives: fewer calls a second share fewer wake-ups, so each costs more.
Prints one JSON line: the server's CPU (user + system) per call of each, and calls/s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import struct
import tempfile
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import cv2
import grpc
import psutil
import zmq

MODES = ("bytes", "protobuf", "frontend", "frontend+zmq")
ID = struct.Struct("<q")
INFER_DONE_BYTES = 200  # about what an encoded InferDone weighs


def _jpeg(cfg_path: Path) -> bytes:
    from pipeline.compositor.jpeg_splice import encode_jpeg
    from pipeline.config import load_config
    from pipeline.gpu_worker.avatar import find_frame

    cfg = load_config(cfg_path)
    model = cfg.models["demo"]
    frame = cv2.imread(str(find_frame(model.background_dir, 0,
                                      {p.name for p in model.background_dir.iterdir()})))
    if frame is None:
        raise SystemExit(f"grpc_floor: cannot read the demo's first frame in {model.background_dir}")
    return encode_jpeg(frame, cfg.jpeg_quality)  # as a compositor writes a frame


def _worker_tier(ipc: str, jpeg: bytes, ready: Event) -> None:
    """The peer of `frontend+zmq`: for each request id, the three messages a batch-8
    request sends the frontend."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    requests, replies = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    requests.bind(f"{ipc}/worker")
    replies.connect(f"{ipc}/frontend")
    ready.set()
    while True:
        request_id = requests.recv()
        replies.send_multipart([b"D" + request_id + bytes(INFER_DONE_BYTES)])
        for _ in range(2):
            replies.send_multipart([b"F" + request_id, jpeg, jpeg, jpeg, jpeg])


class ZmqRoundTrip:
    """The frontend's side of `frontend+zmq`: a request out, its three messages in, read
    from the event loop whenever the inbox's descriptor turns readable."""

    def __init__(self, ipc: str) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.inbox, self.out = self.ctx.socket(zmq.PULL), self.ctx.socket(zmq.PUSH)
        self.inbox.bind(f"{ipc}/frontend")
        self.out.connect(f"{ipc}/worker")
        self.pending: dict[bytes, tuple[list[int], list[bytes], asyncio.Future[list[bytes]]]] = {}
        self.next_id = 0
        loop = asyncio.get_running_loop()
        loop.add_reader(int(self.inbox.getsockopt(zmq.FD)), self._read)
        self.loop = loop

    async def frames(self) -> list[bytes]:
        self.next_id += 1
        request_id = ID.pack(self.next_id)
        future = self.loop.create_future()
        self.pending[request_id] = ([3], [], future)
        self.out.send(request_id, zmq.NOBLOCK)
        try:
            return await future
        finally:
            del self.pending[request_id]

    def _read(self) -> None:
        while True:
            try:
                message = self.inbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            left, frames, future = self.pending[message[0][1:1 + ID.size]]
            frames += message[1:]
            left[0] -= 1
            if not left[0]:
                future.set_result(frames)


async def _serve(mode: str, cfg_path: Path, port: int, ready: Event, ipc: str) -> None:
    from pipeline.config import load_config
    from pipeline.frontend.drain import InflightCalls
    from pipeline.frontend.heap import HeapTrim
    from pipeline.frontend.services import MONOLITHIC, add_services, grpc_options
    from pipeline.rpc import monolithic_pb2 as pb

    cfg = load_config(cfg_path)
    frames = [_jpeg(cfg_path)] * 8
    serialized = pb.CompositeBatchResponse(composited_frames=frames, success=True).SerializeToString()
    if mode.startswith("frontend"):
        server = grpc.aio.server(options=grpc_options(cfg), interceptors=[InflightCalls(HeapTrim())])
        trip = ZmqRoundTrip(ipc) if mode == "frontend+zmq" else None

        class Servicer:
            async def InferBatchComposite(self, request: Any, context: Any) -> Any:
                made = frames if trip is None else await trip.frames()
                return pb.CompositeBatchResponse(composited_frames=made, success=True)

            def __getattr__(self, name: str) -> Any:  # the other methods: never called here
                async def unused(request: Any, context: Any) -> None:
                    return None
                return unused

        add_services(server, cfg, {MONOLITHIC: Servicer()})
    else:
        server = grpc.aio.server(options=grpc_options(cfg))

        async def infer(request: Any, context: Any) -> Any:
            if mode == "bytes":
                return serialized
            return pb.CompositeBatchResponse(composited_frames=frames, success=True)

        raw = mode == "bytes"
        method = grpc.unary_unary_rpc_method_handler(
            infer, request_deserializer=None if raw else pb.CompositeBatchRequest.FromString,
            response_serializer=None if raw else pb.CompositeBatchResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            MONOLITHIC.full_name, {"InferBatchComposite": method}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready.set()
    await server.wait_for_termination()


def _server_main(mode: str, cfg_path: Path, port: int, ready: Event, ipc: str) -> None:
    asyncio.run(_serve(mode, cfg_path, port, ready, ipc))


def _cpu_s(process: psutil.Process) -> float:
    cpu = process.cpu_times()
    return float(cpu.user + cpu.system)


def measure(mode: str, cfg_path: Path, port: int, calls: int, concurrency: int,
            rate: float = 0.0) -> dict[str, float]:
    from pipeline.bench.grpc_load import Clients
    from pipeline.client import build_request

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="grpc-floor-") as folder:
        ipc = f"ipc://{folder}"
        peers = []
        if mode == "frontend+zmq":
            peer_ready = ctx.Event()
            peers.append(ctx.Process(target=_worker_tier, args=(ipc, _jpeg(cfg_path), peer_ready),
                                     daemon=True))
            peers[0].start()
            if not peer_ready.wait(60):
                raise SystemExit("grpc_floor: the worker tier's stand-in did not start")
        ready = ctx.Event()
        server = ctx.Process(target=_server_main, args=(mode, cfg_path, port, ready, ipc),
                             daemon=True)
        server.start()
        assert server.pid is not None
        try:
            if not ready.wait(60):
                raise SystemExit(f"grpc_floor: the {mode} server did not start")
            request = build_request(cfg_path, "demo", 8, start=0, client_visual=False)
            clients = Clients(f"127.0.0.1:{port}", request, concurrency, warmup=20)
            try:
                process = psutil.Process(server.pid)
                cpu0 = _cpu_s(process)
                measured = clients.run(calls, None, concurrency / rate if rate else 0.0)
                cpu = _cpu_s(process) - cpu0
            finally:
                clients.close()
        finally:
            for p in (server, *peers):
                p.kill()
                p.join()
    answered = len(measured.latencies)
    if answered != calls:
        raise SystemExit(f"grpc_floor: the {mode} server answered {answered} of {calls} calls "
                         f"({len(measured.errors)} errors: {measured.errors[:1]})")
    return {"server_cpu_ms_per_call": round(cpu * 1e3 / calls, 3),
            "calls_per_s": round(calls / measured.wall_s, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).parent.parent / "config.yaml")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--port", type=int, default=50091)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="about this many calls a second in all (default: as fast as answered)")
    args = parser.parse_args()
    if args.calls < 1 or args.concurrency < 1 or args.rate < 0:
        parser.error("need --calls >= 1, --concurrency >= 1, --rate >= 0")
    from pipeline.demo.ensure import ensure_model  # the demo avatar's frames

    ensure_model(args.config, "demo")
    result: dict[str, Any] = {"calls": args.calls, "concurrency": args.concurrency,
                              "rate": args.rate}
    for mode in MODES:
        result[mode] = measure(mode, args.config, args.port, args.calls, args.concurrency,
                               args.rate)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
