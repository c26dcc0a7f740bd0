"""Wheels carried to a GPU box in parts: splitting, the sha256 manifest, reassembly, and the
plan of which files travel in which device call.

A device call carries at most 64 MiB of files (the working tree included), and the
onnxruntime-gpu wheel alone is ~256 MB, so wheels over PART_BYTES travel as
`NAME.part00`, `NAME.part01`, ... and are put back together on the box, each part and the
whole checked against the manifest. Standard library only: scripts/gpu-suite runs this
before anything is installed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

PART_BYTES = 55_000_000          # the largest part (55 MB)
CALL_BYTES = 64 * 2**20          # what one device call carries, working tree included
MANIFEST = "wheels-manifest.json"
# the box: CPython 3.12 on x86_64 Linux; pip matches manylinux tags exactly, so every glibc
# level up to the box's is named
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
TARGET_PYTHON = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                 "--abi", "abi3", "--abi", "none"]


class WheelError(Exception):
    """Parts or wheels missing or corrupt; the message names each one."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def part_names(name: str, size: int, part_bytes: int = PART_BYTES) -> list[str]:
    """The part names of a file of `size` bytes; [] when it travels whole."""
    if size <= part_bytes:
        return []
    count = -(-size // part_bytes)
    return [f"{name}.part{i:02d}" for i in range(count)]


def split_wheels(wheels: list[Path], out_dir: Path, part_bytes: int = PART_BYTES) -> dict:
    """Copy each wheel into `out_dir`, those over `part_bytes` as parts; write and return
    the manifest (name, size and sha256 of every wheel and every part)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for wheel in sorted(wheels):
        size = wheel.stat().st_size
        names = part_names(wheel.name, size, part_bytes)
        parts = []
        if not names:
            shutil.copyfile(wheel, out_dir / wheel.name)
        with open(wheel, "rb") as src:
            for name in names:
                (out_dir / name).write_bytes(src.read(part_bytes))
                parts.append({"name": name, "size": (out_dir / name).stat().st_size,
                              "sha256": sha256_file(out_dir / name)})
        entries.append({"name": wheel.name, "size": size, "sha256": sha256_file(wheel),
                        "parts": parts})
    manifest = {"part_bytes": part_bytes, "wheels": entries}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _find(dirs: list[Path], name: str) -> Path | None:
    for d in dirs:
        if (d / name).is_file():
            return d / name
        found = sorted(d.rglob(name)) if d.is_dir() else []
        if found:
            return found[0]
    return None


def load_manifest(dirs: list[Path]) -> dict:
    path = _find(dirs, MANIFEST)
    if path is None:
        raise WheelError(f"no {MANIFEST} in {', '.join(map(str, dirs))}")
    return json.loads(path.read_text())


def reassemble(dirs: list[Path], dest: Path) -> list[Path]:
    """Every wheel of the manifest (found in `dirs`, in any subfolder) whole in `dest`,
    each part and each wheel checked against its sha256; WheelError naming every file
    missing or corrupt (so one message says which device calls to repeat)."""
    manifest = load_manifest(dirs)
    dest.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    wheels = []
    for entry in manifest["wheels"]:
        target = dest / entry["name"]
        if not entry["parts"]:
            found = _find(dirs, entry["name"])
            if found is None:
                problems.append(f"missing {entry['name']}")
                continue
            if found.resolve() != target.resolve():
                shutil.copyfile(found, target)
        else:
            pieces = []
            for part in entry["parts"]:
                found = _find(dirs, part["name"])
                if found is None:
                    problems.append(f"missing {part['name']}")
                elif found.stat().st_size != part["size"] or sha256_file(found) != part["sha256"]:
                    problems.append(f"corrupt {part['name']} (size or sha256 differs)")
                else:
                    pieces.append(found)
            if len(pieces) != len(entry["parts"]):
                continue
            with open(target, "wb") as out:
                for piece in pieces:
                    with open(piece, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        if sha256_file(target) != entry["sha256"]:
            problems.append(f"corrupt {entry['name']} after reassembly (sha256 differs)")
            continue
        wheels.append(target)
    if problems:
        raise WheelError("; ".join(problems))
    return wheels


@dataclass
class Call:
    """One device call of the carry plan: the files it carries (in its own folder)."""

    index: int
    files: list[tuple[str, int]]

    @property
    def size(self) -> int:
        return sum(size for _, size in self.files)


def carry_plan(files: list[tuple[str, int]], capacity: int) -> list[Call]:
    """Files (name, size) packed into as few calls of `capacity` bytes as first-fit
    decreasing gives (the order of arrival does not matter: the suite reassembles once
    every part is there)."""
    calls: list[Call] = []
    for name, size in sorted(files, key=lambda f: (-f[1], f[0])):
        if size > capacity:
            raise WheelError(f"{name} ({size} bytes) exceeds one call's capacity ({capacity})")
        for call in calls:
            if call.size + size <= capacity:
                call.files.append((name, size))
                break
        else:
            calls.append(Call(len(calls) + 1, [(name, size)]))
    return calls


def pip_install_command(python: str, wheels: list[Path], check_into: Path | None = None) -> list[str]:
    """pip installing exactly `wheels` (no index, no dependencies: the set is complete) into
    `python`'s environment; with `check_into`, a `--dry-run` for the box's Python and
    platform into that folder instead, which proves here that the box will accept them."""
    cmd = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check"]
    if check_into is not None:
        cmd += ["--dry-run", "--ignore-installed", "--only-binary=:all:", "--target",
                str(check_into), *TARGET_PYTHON]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
    else:
        cmd += ["--upgrade"]
    return cmd + [str(w) for w in wheels]
