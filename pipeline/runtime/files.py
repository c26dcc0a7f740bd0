"""Files and directories installed for another user to read: an avatar that root prepares
and the service user serves (`lipsync prepare-avatar`, the demo build).

They are staged under a unique temporary name and renamed into place, so an interrupted
write leaves nothing half-done; but `tempfile` creates with 0700 / 0600, and a rename keeps
the mode. Staged here, they get the modes a plain mkdir / open would give: the umask's.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """This process's umask, read without changing it: os.umask() can only read by setting,
    and a thread creating a file meanwhile would get the wrong mode."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc (or a kernel before 4.7): the racy way
    os.umask(mask)
    return mask


def staging_dir(parent: Path, prefix: str) -> Path:
    """A new directory in `parent` with a unique name and the mode mkdir gives."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def staging_file(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A new empty file in `parent` with a unique name and the mode open() gives."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(name)
