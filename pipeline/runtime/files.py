"""Files and folders our tools write for the server to read: created as any other file
(the umask decides the mode, so a server running as another user can read them; tempfile's
0700 folders and 0600 files would keep it out once renamed into place), and whole or not at
all (written under a temporary name, renamed last)."""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path


def new_dir(parent: Path, prefix: str) -> Path:
    """A new, empty, uniquely named folder in `parent` (made with the umask's mode)."""
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name in {parent}")


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path`: readers see the old file or the whole new one. `mode` keeps
    a file's permissions when it replaces one; else the umask decides."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_atomic(source: Path, dest: Path) -> None:
    """Copy `source`'s bytes to `dest` (created with the umask's mode, renamed into place)."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(source, "rb") as src, open(tmp, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
