"""Checks that need a real process or server of their own: a fresh interpreter's imports
and heap, a gRPC server built from the stubs, pip installing the wheels the GPU suite
carries."""
from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from pipeline.rpc import monolithic_pb2, monolithic_pb2_grpc
from tests.unit.rpc.test_stubs import SEED_RPCS
from tests.unit.test_wheelparts import wheelparts

REPO = Path(__file__).resolve().parents[2]


def test_import_does_not_build_the_filterbank() -> None:
    """Importing the module leaves the filterbank unbuilt until used, and building it imports
    neither librosa nor scipy (1.2 s of CPU at each worker start when it did)."""
    code = (
        "import sys; from pipeline.gpu_worker import mel as mel_math; "
        "assert mel_math._mel_basis.cache_info().currsize == 0; "
        "mel_math.warm_up(); assert mel_math._mel_basis.cache_info().currsize == 1; "
        "heavy = {'librosa', 'scipy', 'numba'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


class _HealthOnly(monolithic_pb2_grpc.MonolithicServiceServicer):
    def Health(self, request, context):  # type: ignore[no-untyped-def]
        return monolithic_pb2.HealthResponse(healthy=True, max_models=7, gpu_ids=[0, 1])


def test_seed_method_paths_are_served() -> None:
    """A server built from the stubs serves /monolithic.MonolithicService/<RPC> for each seed RPC."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    monolithic_pb2_grpc.add_MonolithicServiceServicer_to_server(_HealthOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for rpc, (request, response) in SEED_RPCS.items():
                call = channel.unary_unary(
                    f"/monolithic.MonolithicService/{rpc}",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=getattr(monolithic_pb2, response).FromString)
                req = getattr(monolithic_pb2, request)()
                if rpc == "Health":
                    assert call(req, timeout=10).max_models == 7
                    continue
                with pytest.raises(grpc.RpcError) as info:
                    call(req, timeout=10)
                # the servicer's own default, not "Method not found!": the path is registered
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
                assert info.value.details() == "Method not implemented!", rpc
            stub = monolithic_pb2_grpc.MonolithicServiceStub(channel)
            reply = stub.Health(monolithic_pb2.HealthRequest(), timeout=10)
            assert (reply.healthy, list(reply.gpu_ids)) == (True, [0, 1])
    finally:
        server.stop(None)


def test_pip_accepts_the_wheels_for_the_box_python(tmp_path: Path, wheels: list[Path]) -> None:
    """The dry-run install command for CPython 3.12 on manylinux x86_64 accepts real wheels
    and installs nothing."""
    cmd = wheelparts.pip_install_command(sys.executable, wheels, check_into=tmp_path / "target")
    assert cmd[:3] == [sys.executable, "-m", "pip"] and "--dry-run" in cmd
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Would install bigpkg-1.0 smallpkg-1.0" in done.stdout
    assert not (tmp_path / "target").exists()
    real = wheelparts.pip_install_command("python3", wheels)
    assert "--dry-run" not in real and "--no-index" in real and "--no-deps" in real


_FREED_IN_THREADS = """
import threading
from pipeline.runtime.process import keep_freed_memory, private_bytes, release_free_heap

keep_freed_memory()
before = private_bytes()

def burst():  # what a request's buffers are: megabytes, written, freed on another thread
    for _ in range(3):
        buffer = bytearray(20 << 20)
        buffer[::4096] = b"x" * len(buffer[::4096])
        del buffer

threads = [threading.Thread(target=burst) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
release_free_heap()
print((private_bytes() - before) >> 20)
"""


def test_buffers_freed_on_other_threads_go_back_to_the_os() -> None:
    """A burst of large buffers allocated and freed on threads other than the main one
    (grpc's and the executor's) is handed back by `release_free_heap` once they are freed.
    glibc gave each such thread an arena of its own, and malloc_trim never shrinks the top
    of those: a frontend idled 70-160 MB above its baseline after bursts of 20 MB requests,
    depending on which threads had served them."""
    kept_mb = int(subprocess.run([sys.executable, "-c", _FREED_IN_THREADS], check=True,
                                 capture_output=True, text=True).stdout)
    assert kept_mb < 8, f"{kept_mb} MB of freed buffers kept after release_free_heap"


_GROWING_VISUAL_BUFFER = """
from pipeline.gpu_worker.inputs import RequestInputs
from pipeline.runtime.process import keep_freed_memory, private_bytes

keep_freed_memory()  # as every role runs
inputs = RequestInputs(lambda ref: None)
before = private_bytes()
for frames in range(1, 9):  # requests of growing batch, as a worker meets them
    inputs.room_to_build(frames)[...] = 1.0
print((private_bytes() - before) >> 20)
"""


def test_the_built_visual_buffer_keeps_only_its_own_size() -> None:
    """The worker's buffer for the visual inputs it builds grows with the largest request
    it has met; the buffers it replaced go back to the OS, not into a heap that keeps them
    (requests of 1..8 frames kept 55-90 MB for a buffer of 19.7)."""
    kept_mb = int(subprocess.run([sys.executable, "-c", _GROWING_VISUAL_BUFFER], check=True,
                                 capture_output=True, text=True).stdout)
    assert kept_mb < 26, f"{kept_mb} MB kept for a visual buffer of 8 frames (19.7 MB)"
