"""Files that must never be readable by others, not even for an instant: keys, credentials, certificates' keys."""

from __future__ import annotations

import os
from pathlib import Path


def write_file_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` with exactly ``mode`` whatever the umask, synced, replacing it in one step.

    The temporary file is created with the mode (and chmod'ed again: ``O_CREAT`` keeps the mode of a
    leftover file), so the content never exists with wider access.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
