"""The in-flight table (no process, no socket; a real shared-memory arena): what a request
writes and sends, how its frames complete it, and who owns its arena block on every ending —
answered, failed, abandoned by its client, or lost with its worker. The worker client and the
liveness view are fakes typed by the table's Protocols."""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline import messages as msg
from pipeline.config import parse_config
from pipeline.frontend import inflight as inflight_module
from pipeline.frontend.errors import Failed, Overloaded, Unavailable
from pipeline.frontend.inflight import (
    AliveWorkers,
    ArenaDoesNotFit,
    InferResult,
    InFlight,
    WorkerSend,
    create_arena,
)
from pipeline.frontend.liveness import RoleView
from pipeline.frontend.validation import InferInput, InvalidRequest
from pipeline.protocol import RequestLayout
from pipeline.runtime.addresses import Addresses
from pipeline.shm.arena import Arena
from pipeline.shm.segment import shm_space
from pipeline.synctalk import FEATURE_BYTES
from tests.unit.frontend.fakes import run, until

AUDIO = np.linspace(-1, 1, 10240, dtype=np.float32)


class Client:
    """The worker client: records every message sent, decoded as a gpu_worker would."""

    def __init__(self, addresses: Addresses) -> None:
        self.addresses = addresses
        self.sent: list[tuple[int, msg.Message]] = []
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    async def send(self, worker: int, message: bytes) -> None:
        self.sent.append((worker, msg.worker_decoder.decode(message)))


class Alive:
    """The liveness view: workers 0 and 1 alive unless removed."""

    def __init__(self) -> None:
        self.views = {0: RoleView(pid=4242), 1: RoleView(pid=4343)}

    def worker(self, index: int) -> RoleView | None:
        return self.views.get(index)


class World:
    def __init__(self, table: InFlight, client: Client, alive: Alive) -> None:
        self.table, self.client, self.alive = table, client, alive

    @property
    def blocks(self) -> int:
        return self.table.arena.blocks_in_use

    def submit(self, req: InferInput, worker: int = 0,
               timeout: float = 10.0) -> asyncio.Task[InferResult]:
        return asyncio.create_task(self.table.submit(worker, req, time.monotonic() + timeout))

    async def sent(self, count: int) -> msg.Message:
        """The count-th message sent, once it is."""
        await until(lambda: len(self.client.sent) >= count)
        return self.client.sent[count - 1][1]

    def frame(self, request_id: int, index: int, compositor: int = 0) -> None:
        self.frames(request_id, index, 1, compositor)

    def frames(self, request_id: int, first: int, count: int, compositor: int = 0) -> None:
        """A job's frames [first, first + count), as a compositor sends them."""
        self.table.on_frames_done(
            msg.FramesDone(request_id, first, compositor, paste_ns=10 * count, jpeg_ns=20 * count),
            [b"jpeg%d" % i for i in range(first, first + count)])

    def done(self, request_id: int) -> None:
        self.table.on_infer_done(msg.InferDone(request_id, 0, 0, 0, 0, 0, 0,
                                               composite_start_ns=time.monotonic_ns()), [])

    def answer(self, request_id: int, frames: int) -> None:
        """The worker tier's whole answer: every frame, then InferDone."""
        for i in range(frames):
            self.frame(request_id, i)
        self.done(request_id)


@pytest.fixture
def world(tmp_path: Path, instance: str) -> Iterator[World]:
    """An in-flight table with a 64 MB arena of a fresh instance (removed after)."""
    cfg = parse_config({"runtime": {"instance": instance, "arena_mb": 64, "dir": str(tmp_path)},
                        "models": {}}, base_dir=tmp_path)
    client, alive = Client(Addresses.of(cfg)), Alive()
    sender: WorkerSend = client
    workers: AliveWorkers = alive
    table = InFlight(cfg, sender, workers)
    yield World(table, client, alive)
    table.close()


def request(batch: int = 2, visual: bool = True, features: bool = False,
            nan: bool = False) -> InferInput:
    pixels = None
    if visual:
        pixels = np.random.default_rng(batch).random((batch, 6, 320, 320), np.float32)
        if nan:
            pixels[-1, 5, 319, 319] = np.nan
    return InferInput("demo", batch, 3, pixels, None if features else AUDIO, 16000,
                      np.full(FEATURE_BYTES // 4, 0.5, np.float32) if features else None)


@pytest.mark.parametrize("visual, features", [(True, False), (False, False), (False, True)])
def test_submit_writes_the_inputs_where_its_request_says(world: World, visual: bool,
                                                          features: bool) -> None:
    """The InferRequest names the worker's pid and the block's tensors exactly as
    RequestLayout lays them out; the arena holds the client's visual and audio (or features)
    there; without a visual, the worker builds it and the block has no room for one."""
    req = request(visual=visual, features=features)

    async def scenario() -> None:
        task = world.submit(req)
        m = await world.sent(1)
        assert isinstance(m, msg.InferRequest)
        block = world.table.pending[m.request_id].block
        assert block is not None
        layout = RequestLayout(2, 0 if features else AUDIO.nbytes,
                               FEATURE_BYTES if features else 0, visual=visual)
        refs = layout.refs(world.table.arena.name, block.offset)
        assert (m.visual, m.output, m.audio, m.features) == \
            (refs.get("visual"), refs["output"], refs.get("audio"), refs.get("features"))
        assert (m.visual is None) is not visual
        assert block.size == -(-layout.nbytes // 4096) * 4096
        assert (m.worker_pid, m.model_id, m.batch_size, m.start_frame_idx, m.sample_rate) == \
            (4242, "demo", 2, 3, 16000)
        arena = world.table.arena
        if req.visual is not None:
            assert np.array_equal(arena.ndarray(m.visual.offset, m.visual.shape, "float32"),
                                  req.visual)
        if features:
            assert m.features is not None and req.features is not None
            assert np.array_equal(arena.ndarray(m.features.offset, m.features.shape, "float32"),
                                  req.features)
        else:
            assert m.audio is not None
            assert np.array_equal(arena.ndarray(m.audio.offset, m.audio.shape, "float32"), AUDIO)
        world.answer(m.request_id, 2)
        assert (await task).frames == [b"jpeg0", b"jpeg1"]

    run(scenario)
    assert world.blocks == 0


def test_frames_and_infer_done_complete_a_request_in_order(world: World) -> None:
    """Frames arrive out of order, InferDone before the last one, a duplicate and an
    out-of-range frame among them: the result has each frame in its place, the compositors'
    times (critical path: the busiest compositor), and the block is given back."""
    async def scenario() -> InferResult:
        task = world.submit(request(batch=3))
        await world.sent(1)
        world.frame(1, 2, compositor=0)
        world.frame(1, 2, compositor=0)      # a duplicate: ignored
        world.frame(1, 7, compositor=0)      # out of range: ignored
        world.frame(1, 0, compositor=1)
        world.done(1)
        await asyncio.sleep(0.01)
        assert not task.done()
        world.frame(1, 1, compositor=0)
        return await task

    result = run(scenario)
    assert result.frames == [b"jpeg0", b"jpeg1", b"jpeg2"]
    assert (result.paste_ns, result.jpeg_ns, result.critical_ns) == (30, 60, 60)
    assert result.input_copy_ns > 0 and result.done.request_id == 1
    assert world.blocks == 0 and not world.table.pending


def test_a_jobs_frames_land_in_their_places_and_a_redispatched_jobs_duplicates_are_dropped(
        world: World) -> None:
    """Jobs of several frames each, out of order; a lost compositor's job handed again
    arrives a second time (whole, and overlapping a frame already here) and one runs past
    the batch: each frame is taken once, its job's times counted once."""
    async def scenario() -> InferResult:
        task = world.submit(request(batch=5))
        await world.sent(1)
        world.frames(1, 3, 2, compositor=1)
        world.frames(1, 3, 2, compositor=0)   # the same job again: nothing new
        world.frames(1, 0, 2, compositor=0)
        world.frames(1, 4, 3, compositor=0)   # frame 4 is here, 5 and 6 are past the batch
        world.done(1)
        await asyncio.sleep(0.01)
        assert not task.done()
        world.frames(1, 2, 1, compositor=1)
        return await task

    result = run(scenario)
    assert result.frames == [b"jpeg%d" % i for i in range(5)]
    assert (result.paste_ns, result.jpeg_ns) == (50, 100)
    assert result.critical_ns == 90  # compositor 1: frames 2, 3 and 4
    assert world.blocks == 0 and not world.table.pending


@pytest.mark.parametrize("give_up", ["timeout", "cancel"])
@pytest.mark.parametrize("finished", [msg.InferDone, msg.InferFailed])
def test_an_abandoned_request_keeps_its_block_until_its_worker_finished(
        world: World, give_up: str, finished: type) -> None:
    """The client times out or cancels while the worker computes: the block stays owned
    (the worker may still write into it) until the worker reports the request done or
    failed."""
    async def scenario() -> None:
        task = world.submit(request(), timeout=0.05 if give_up == "timeout" else 10)
        await world.sent(1)
        if give_up == "cancel":
            task.cancel()
        with pytest.raises(TimeoutError if give_up == "timeout" else asyncio.CancelledError):
            await task
        await asyncio.sleep(0.01)
        assert world.blocks == 1 and world.table.pending[1].abandoned
        world.frame(1, 0)  # a late frame changes nothing
        assert world.blocks == 1
        if finished is msg.InferDone:
            world.done(1)
        else:
            world.table.on_failed(msg.InferFailed(1, "UNet failed"), [])
        await asyncio.sleep(0.01)  # the loop's callbacks run (the failure is seen as retrieved)

    run(scenario)
    assert world.blocks == 0 and not world.table.pending


def test_a_silent_worker_keeps_the_blocks_it_may_still_write(world: World) -> None:
    """fail_worker(restarted=False): its requests fail Unavailable at once; the block of one
    it has not finished stays owned until it reports it, the block of one it reported done
    (only frames missing) is given back; another worker's request is untouched."""
    async def scenario() -> list[BaseException | InferResult]:
        # no visual: written inline, so the ids follow the order of submission
        computing, composited, other = (world.submit(request(1, visual=False)),
                                        world.submit(request(1, visual=False)),
                                        world.submit(request(1, visual=False), worker=1))
        await world.sent(3)
        world.done(2)
        world.table.fail_worker(0, "gpu_worker 0 is unavailable (no heartbeat)", restarted=False)
        results = await asyncio.gather(computing, composited, return_exceptions=True)
        assert world.blocks == 2 and set(world.table.pending) == {1, 3}
        world.done(1)
        assert world.blocks == 1
        world.frame(3, 0)
        world.done(3)
        return [*results, await other]

    computing, composited, other = run(scenario)
    assert isinstance(computing, Unavailable) and isinstance(composited, Unavailable)
    assert str(computing) == "gpu_worker 0 is unavailable (no heartbeat); request failed"
    assert isinstance(other, InferResult) and world.blocks == 0


def test_a_restarted_worker_gives_its_blocks_back_at_once(world: World) -> None:
    """fail_worker(restarted=True): the new process cannot write into the old one's blocks,
    so they are released as its requests fail Unavailable (background frames too)."""
    async def scenario() -> list[object]:
        tasks = [world.submit(request(1)), world.submit(request(1)),
                 asyncio.create_task(world.table.background_jpegs(0, "demo", (1,),
                                                             time.monotonic() + 10))]
        await world.sent(3)
        world.table.fail_worker(0, "gpu_worker 0 restarted", restarted=True)
        assert world.blocks == 0 and not world.table.pending
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    errors = run(scenario)
    assert [str(e) for e in errors] == ["gpu_worker 0 restarted; request failed"] * 3


@pytest.mark.parametrize("failure", [msg.InferFailed(1, "Model 'demo' not loaded"),
                                     msg.FramesFailed(1, 1, "Model 'demo' not loaded")])
def test_a_failure_report_fails_the_request_and_frees_its_block(world: World,
                                                               failure: msg.Message) -> None:
    """InferFailed, or FramesFailed for a job not yet received: the request fails with the
    worker's error and its block is given back."""
    async def scenario() -> None:
        task = world.submit(request())
        await world.sent(1)
        world.frame(1, 0)
        world.table.on_failed(failure, [])
        with pytest.raises(Failed) as failed:
            await task
        assert str(failed.value) == "Model 'demo' not loaded"

    run(scenario)
    assert world.blocks == 0 and not world.table.pending


def test_a_late_duplicate_frame_failure_is_ignored(world: World) -> None:
    """A FramesFailed (a revived compositor's) for a job already received changes nothing:
    the request completes with its frames."""
    async def scenario() -> InferResult:
        task = world.submit(request())
        await world.sent(1)
        world.frame(1, 0)
        world.table.on_failed(msg.FramesFailed(1, 0, "compositor 0 restarted"), [])
        world.frame(1, 1)
        world.done(1)
        return await task

    assert run(scenario).frames == [b"jpeg0", b"jpeg1"]


def test_a_request_larger_than_the_arena_is_refused_at_once(world: World) -> None:
    """A request that cannot fit the arena even when empty: Overloaded naming both sizes and
    the setting; nothing allocated, nothing sent."""
    async def scenario() -> str:
        with pytest.raises(Overloaded) as refused:
            await world.submit(request(batch=60, visual=False))
        return str(refused.value)

    error = run(scenario)
    needed = RequestLayout(60, AUDIO.nbytes).nbytes
    assert error == (f"request needs {needed} bytes of shared memory; the arena has "
                     f"{64 * 2**20} (runtime.arena_mb)")
    assert world.blocks == 0 and not world.client.sent


def test_a_full_arena_is_waited_for_until_the_deadline(world: World) -> None:
    """The arena is held by a 52-frame request: a request with a short deadline is refused
    Overloaded; one with time left is sent as soon as the first gives its block back."""
    async def scenario() -> tuple[str, int]:
        big = world.submit(request(batch=52, visual=False))
        await world.sent(1)
        waiting = world.submit(request(), timeout=10)
        with pytest.raises(Overloaded) as refused:
            await world.submit(request(), timeout=0.05)
        assert len(world.client.sent) == 1
        world.answer(1, 52)
        await big
        m = await world.sent(2)
        assert isinstance(m, msg.InferRequest)
        world.answer(m.request_id, 2)
        await waiting
        return str(refused.value), world.blocks

    error, blocks = run(scenario)
    assert error == "server busy: no shared memory freed before the deadline"
    assert blocks == 0


def test_a_dead_worker_or_a_nan_visual_fails_before_sending_and_frees_the_block(
        world: World) -> None:
    """The worker is not alive: Unavailable; the visual holds a NaN: InvalidRequest. Either
    way nothing is sent and the block is given back."""
    async def scenario() -> list[BaseException]:
        errors: list[BaseException] = []
        with pytest.raises(InvalidRequest) as invalid:
            await world.submit(request(nan=True))
        errors.append(invalid.value)
        del world.alive.views[0]
        with pytest.raises(Unavailable) as unavailable:
            await world.submit(request())
        errors.append(unavailable.value)
        return errors

    invalid, unavailable = run(scenario)
    assert str(invalid) == "visual_frames contains NaN or Inf values"
    assert str(unavailable) == "gpu_worker 0 is unavailable (restarting or not answering)"
    assert world.blocks == 0 and not world.client.sent and not world.table.pending


def test_a_request_cancelled_mid_copy_frees_its_block_once_the_copy_ends(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled while its visual is being copied in a thread: the block stays owned while
    the thread writes into it, and is given back when the copy ends; nothing is sent."""
    copying, finish = threading.Event(), threading.Event()

    def slow_copy(source: np.ndarray, target: np.ndarray) -> None:
        copying.set()
        finish.wait(10)

    monkeypatch.setattr(inflight_module, "copy_finite_visual", slow_copy)

    async def scenario() -> None:
        task = world.submit(request())
        await asyncio.to_thread(copying.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert world.blocks == 1
        finish.set()
        await until(lambda: world.blocks == 0)

    run(scenario)
    assert not world.client.sent


def test_background_frames_come_back_without_an_arena_block(world: World) -> None:
    """background_jpegs(): BackgroundJpegs to the worker's pid with the indices, the JPEGs back in
    order, no block used; a dead worker is Unavailable; a deadline passed is TimeoutError
    and leaves no entry behind."""
    async def scenario() -> list[bytes]:
        task = asyncio.create_task(world.table.background_jpegs(1, "demo", (5, 9),
                                                           time.monotonic() + 10))
        m = await world.sent(1)
        assert m == msg.BackgroundJpegs(1, 4343, "demo", (5, 9))
        assert world.blocks == 0
        world.frame(1, 1)
        world.frame(1, 0)
        world.done(1)
        frames = await task
        with pytest.raises(TimeoutError):
            await world.table.background_jpegs(0, "demo", (1,), time.monotonic() + 0.02)
        del world.alive.views[0]
        with pytest.raises(Unavailable):
            await world.table.background_jpegs(0, "demo", (1,), time.monotonic() + 10)
        return frames

    assert run(scenario) == [b"jpeg0", b"jpeg1"]
    assert not world.table.pending


def test_the_snapshot_counts_requests_per_worker_and_the_arena(world: World) -> None:
    """snapshot(): requests in flight in all and per worker, and the arena's use."""
    async def scenario() -> dict[str, object]:
        tasks = [world.submit(request(1)), world.submit(request(1)),
                 world.submit(request(1), worker=1)]
        await world.sent(3)
        snapshot = world.table.snapshot()
        world.table.fail_worker(0, "gone", restarted=True)
        world.table.fail_worker(1, "gone", restarted=True)
        await asyncio.gather(*tasks, return_exceptions=True)
        return snapshot

    snapshot = run(scenario)
    arena = world.table.arena
    block = RequestLayout(1, AUDIO.nbytes, visual=True).nbytes
    assert snapshot == {"inflight_requests": 3, "per_worker": {0: 2, 1: 1},
                        "arena": {"name": arena.name, "capacity_bytes": 64 * 2**20,
                                  "used_bytes": 3 * ((block + 4095) // 4096 * 4096),
                                  "blocks": 3}}


def test_the_arena_waits_briefly_for_dev_shm_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/shm full for a moment (a dead frontend's arena still mapped): the arena is
    created once space comes back; still full after the wait, the role stops with one line
    (a RoleError) saying what does not fit and what to change."""
    attempts: list[str] = []
    made = object()

    def create(name: str, size: int) -> object:
        attempts.append(name)
        if len(attempts) < 3:
            raise MemoryError("/dev/shm is full")
        return made

    monkeypatch.setattr(Arena, "create", create)
    monkeypatch.setattr(inflight_module.time, "sleep", lambda _: None)
    assert create_arena("arena", 1) is made and len(attempts) == 3
    attempts.clear()
    monkeypatch.setattr(inflight_module, "ARENA_SPACE_WAIT_S", -1.0)
    with pytest.raises(ArenaDoesNotFit, match=r"runtime\.arena_mb.*/dev/shm.*--shm-size"):
        create_arena("arena", 2**20)
    assert len(attempts) == 1


def test_a_start_checks_that_dev_shm_has_room_for_the_arena(tmp_path: Path,
                                                              instance: str) -> None:
    """`lipsync serve`'s check before any role starts: an arena /dev/shm has room for
    passes; one larger than what is free is refused with the arena's size and the way out."""
    from pipeline.frontend.inflight import check_arena_fits

    def config(arena_mb: int):
        return parse_config({"runtime": {"instance": instance, "arena_mb": arena_mb,
                                         "dir": str(tmp_path)}, "models": {}}, base_dir=tmp_path)

    check_arena_fits(config(64))
    too_big = shm_space()[0] // 2**20 + 1024
    with pytest.raises(ArenaDoesNotFit, match=f"runtime.arena_mb: {too_big} MB.*--shm-size"):
        check_arena_fits(config(too_big))


def test_an_arena_larger_than_all_of_dev_shm_is_refused_without_waiting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No role can give back more than /dev/shm holds: no attempt, no wait."""
    monkeypatch.setattr(Arena, "create", lambda name, size: pytest.fail("attempted"))
    total = shm_space()[1]
    with pytest.raises(ArenaDoesNotFit, match=f"of {total // 2**20} MB"):
        create_arena("arena", total + 2**20)
