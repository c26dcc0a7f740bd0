"""Which files under `models_root` the server wrote, so that it never writes over any other.

Each generated directory (the demo avatar's `demo/`, the bench model's `bench/`) holds a
`build.json` that records the sha256 of every file the build wrote there, and of the files
beside it that it also wrote (`shared`: the demo's audio encoder in `models_root`). A file
is the server's to replace only while its bytes are the ones recorded: one the user put
there, or changed, is theirs.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.runtime.files import sha256_file

MANIFEST = "build.json"


class DemoAssetsError(ValueError):
    """A generated asset cannot be written where the config puts it; the message names the
    file in the way."""


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """The directory's build.json ({} when absent or unreadable)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def write_manifest(directory: Path, fields: dict[str, Any], files: list[Path],
                   shared: dict[str, str] | None = None) -> None:
    """Record `fields` and the hashes of `files` (under `directory`, written by the build)
    and of `shared` (name -> hash, beside it)."""
    hashes = {str(p.relative_to(directory)): sha256_file(p) for p in files}
    (directory / MANIFEST).write_text(json.dumps({**fields, "files": hashes,
                                                  "shared": shared or {}}))


def matches(path: Path, recorded: object) -> bool:
    """Whether `path` is a regular file whose bytes have the recorded hash."""
    return (isinstance(recorded, str) and path.is_file() and not path.is_symlink()
            and sha256_file(path) == recorded)


def foreign_files(directory: Path) -> list[Path]:
    """The files under `directory` that its build.json does not vouch for ([] when it does
    not exist). A build.json without hashes (written before they were recorded) vouches for
    the whole directory: nothing but a build ever wrote one."""
    if not directory.is_dir() or directory.is_symlink():
        return [directory] if os.path.lexists(directory) else []
    manifest = read_manifest(directory)
    if "files" not in manifest and "version" in manifest:
        return []
    recorded = manifest.get("files", {})
    return [p for p in sorted(directory.rglob("*"))
            if (p.is_symlink() or not p.is_dir()) and p.name != MANIFEST
            and not matches(p, recorded.get(str(p.relative_to(directory))))]
