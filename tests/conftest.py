"""Shared fixtures: the demo assets (built once per session) and a config around them."""
from __future__ import annotations

import base64
import hashlib
import itertools
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.demo.assets import build_demo_assets

# Real data from the original server, in the shared/ folder beside the checkout (as in CI).
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference"
# A SyncTalk-2D training run with random weights and SyncTalk-2D's own outputs, beside it.
SYNCTALK2D = REFERENCE.parent / "synctalk2d"


def synctalk2d_run() -> Path:
    """The SyncTalk-2D training-run fixture; the calling test skips, saying why, when absent."""
    if not (SYNCTALK2D / "reference" / "pred.npy").is_file():
        pytest.skip(f"SyncTalk-2D fixture not found: {SYNCTALK2D} is absent "
                    "(shared/ must sit beside the checkout)")
    return SYNCTALK2D


def reference_file(name: str) -> Path:
    """A reference fixture; the calling test skips, saying why, when shared/ is absent."""
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"reference fixture {name} not found: {REFERENCE} is absent "
                    "(shared/ must sit beside the checkout)")
    return path

DEMO_FRAMES = 250
_instances = itertools.count()


@pytest.fixture
def instance() -> Iterator[str]:
    """A fresh runtime instance name; every shared-memory segment of it is removed after."""
    from pipeline.shm.segment import PREFIX, SHM_DIR

    name = f"ut{os.getpid()}x{next(_instances)}"
    yield name
    for entry in SHM_DIR.glob(f"{PREFIX}-{name}-*"):
        entry.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models_root holding the built-in demo avatar and graphs."""
    root = tmp_path_factory.mktemp("models")
    build_demo_assets(root, num_frames=DEMO_FRAMES)
    return root


SMALL_FRAMES = 32


@pytest.fixture(scope="session")
def small_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo avatar with 32 frames, for tests where wrap-around at 250 is not the point
    (its server starts and loads in a fraction of the full avatar's time)."""
    root = tmp_path_factory.mktemp("small_models")
    build_demo_assets(root, num_frames=SMALL_FRAMES)
    return root


def ops_stats(config: Path, command: str = "stats") -> dict:
    """The ops socket's answer of the server started from `config`."""
    from pipeline.cli.stats import fetch
    from pipeline.config import load_config
    from pipeline.runtime.addresses import Addresses

    return fetch(Addresses.of(load_config(config)).ops, command=command)


def _built_frames(models_root: Path) -> int:
    """The frame count of the demo avatar built in `models_root` (the full demo's when
    none is built yet: `lipsync serve` builds that)."""
    import json

    try:
        return int(json.loads((models_root / "demo" / "build.json").read_text())["num_frames"])
    except (OSError, ValueError, KeyError):
        return DEMO_FRAMES


def write_config(path: Path, models_root: Path, **overrides: object) -> Path:
    """A config for tests: the demo model, a per-test instance name and runtime dir."""
    frames = _built_frames(models_root)
    raw: dict[str, object] = {
        "server": {"host": "127.0.0.1", "request_timeout_s": 60},
        "gpus": {"count": 1, "provider": "cpu"},
        "compositor": {"pool_size": 2},
        "runtime": {"dir": str(path.parent / "run"),
                    "instance": f"t{os.getpid()}{path.parent.name[-6:].replace('-', '_')}",
                    "arena_mb": 512},
        "ops": {"metrics_port": 0},
        "models_root": str(models_root),
        "audio_encoder_path": "audio_encoder.onnx",
        "models": {"demo": {"model_path": "demo/unet.onnx", "background_dir": "demo/frames",
                            "crop_rects_path": "demo/crop_rects.json", "num_frames": frames,
                            "preload_model": True}},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})  # type: ignore[assignment]
        node[leaf] = value  # type: ignore[index]
    path.write_text(yaml.safe_dump(raw))
    return path


def child_pids(pid: int) -> set[int]:
    """Every descendant of pid, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def role_pids(root: int, role: str) -> list[int]:
    """The descendants of root that run `role` (process title `lipsync: <role>...`)."""
    title = f"lipsync: {role}".encode()
    pids = []
    for pid in sorted(child_pids(root)):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title):
                pids.append(pid)
        except OSError:  # gone meanwhile
            continue
    return pids


def _wheel(folder: Path, name: str, payload: bytes) -> Path:
    """A valid pure-Python wheel (pip installs it) carrying `payload` in one module."""
    dist = f"{name}-1.0"
    files = {f"{name}/__init__.py": b"DATA = " + repr(payload).encode() + b"\n",
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\n"
                                           "Version: 1.0\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
                                        b"Root-Is-Purelib: true\nTag: py3-none-any\n"}

    def record(data: bytes) -> str:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"sha256={digest},{len(data)}"

    lines = [f"{path},{record(data)}" for path, data in files.items()]
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(lines) + f"\n{dist}.dist-info/RECORD,,\n").encode()
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name_in_zip, data in files.items():
            z.writestr(name_in_zip, data)
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "download"
    folder.mkdir()
    return [_wheel(folder, "bigpkg", bytes(range(256)) * 40),   # ~10 kB: split
            _wheel(folder, "smallpkg", b"x")]                     # whole
