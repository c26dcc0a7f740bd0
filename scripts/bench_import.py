"""Time `lipsync import-synctalk` on a training run of SyncTalk-2D's size (docs/benchmarks.md,
"Importing a SyncTalk-2D training run").

    .venv/bin/python scripts/bench_import.py --frames 250 --repeat 3 [--run ROOT --name NAME]

Without --run it writes a synthetic run into a temporary folder first (pipeline/bench/
training_run.py: the bench model's 12.2 M weights saved as a torch.save zip checkpoint, an
audio encoder, --frames demo frames of 1280x720 with their landmarks). Then it runs the real
command --repeat times, each into a fresh folder, and prints one JSON line: the command, each
run's wall time (process start to exit) and the command's own summary line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="an existing training run (default: synthetic)")
    parser.add_argument("--name", default="bench", help="the avatar's name in the run")
    parser.add_argument("--frames", type=int, default=250, help="frames of the synthetic run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        root = args.run
        if root is None:
            from pipeline.bench.training_run import write_training_run

            root = write_training_run(Path(tmp) / "run", args.name, args.frames)
        walls, summaries = [], []
        for i in range(args.repeat):
            command = [sys.executable, "-m", "pipeline.cli", "import-synctalk", str(root),
                       args.name, "--out", str(Path(tmp) / f"out{i}")]
            t0 = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            walls.append(round(time.perf_counter() - t0, 2))
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            summaries.append(done.stdout.splitlines()[0])
        print(json.dumps({"command": " ".join(["lipsync", *command[3:-2]]), "wall_s": walls,
                          "median_wall_s": statistics.median(walls), "summaries": summaries}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
