"""What an idle server costs: the CPU and the wake-ups of every process of `lipsync serve`
(the supervisor and each role) while no client sends anything (docs/benchmarks.md, "An
idle server").

    .venv/bin/python scripts/idle_cpu.py --config config.yaml --seconds 20

Starts a server of its own on free ports (as `lipsync bench` does), lets it settle, then
reads each thread's run time (`/proc/<pid>/task/<tid>/schedstat`: nanoseconds, where the
`stat` ticks are 10 ms) and voluntary context switches (each one a wake-up after a sleep)
at the start and the end of the window. Prints one JSON line: per process, CPU ms per
second and wake-ups per second, its busiest threads, and the total. Linux only.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

from pipeline.bench.local_server import start_server
from pipeline.demo.ensure import ensure_model

Sample = dict[tuple[str, str, int], tuple[int, int]]  # (process, thread, tid) -> (ns, wakes)


def process_name(proc: psutil.Process) -> str:
    """The role's title (`lipsync: gpu_worker 0`), or `supervisor` for `lipsync serve`."""
    title = " ".join(proc.cmdline()).strip()
    return title.removeprefix("lipsync: ") if title.startswith("lipsync: ") else "supervisor"


def sample(root: psutil.Process) -> Sample:
    out: Sample = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = process_name(proc)
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                ns = int((task / "schedstat").read_text().split()[0])
                wakes = next(int(line.split()[1]) for line in (task / "status").open()
                             if line.startswith("voluntary_ctxt_switches"))
                thread = (task / "comm").read_text().strip()
                out[(name, thread, int(task.name))] = (ns, wakes)
        except (psutil.Error, OSError):  # a thread or process that ended meanwhile
            continue
    return out


def idle_figures(before: Sample, after: Sample, seconds: float) -> dict[str, object]:
    cpu: dict[str, float] = {}
    wakes: dict[str, float] = {}
    threads: dict[str, list[dict[str, object]]] = {}
    for key, (ns, woke) in after.items():
        ns0, woke0 = before.get(key, (0, 0))
        name, thread, _ = key
        thread_cpu, thread_wakes = (ns - ns0) / 1e6 / seconds, (woke - woke0) / seconds
        cpu[name] = cpu.get(name, 0.0) + thread_cpu
        wakes[name] = wakes.get(name, 0.0) + thread_wakes
        if thread_cpu >= 0.05 or thread_wakes >= 1:
            threads.setdefault(name, []).append({"thread": thread,
                                                 "cpu_ms_per_s": round(thread_cpu, 2),
                                                 "wakeups_per_s": round(thread_wakes, 1)})
    return {"seconds": round(seconds, 1), "total_cpu_ms_per_s": round(sum(cpu.values()), 2),
            "processes": {name: {"cpu_ms_per_s": round(cpu[name], 2),
                                 "wakeups_per_s": round(wakes[name], 1),
                                 "threads": threads.get(name, [])} for name in sorted(cpu)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--model", default="demo", help="made sure of first (built if absent)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after the server is ready before the window opens")
    args = parser.parse_args()
    ensure_model(args.config, args.model)
    with ExitStack() as stack:
        server = start_server(stack, args.config)
        assert server.proc is not None
        root = psutil.Process(server.proc.pid)
        time.sleep(args.settle)
        before, t0 = sample(root), time.monotonic()
        time.sleep(args.seconds)
        after, t1 = sample(root), time.monotonic()
    print(json.dumps(idle_figures(before, after, t1 - t0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
