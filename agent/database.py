"""SQLite opened the one way both ends of the alert path need: WAL and a full fsync per commit."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from .errors import OutboxError


def open_durable(path: Path, schema: str, what: str) -> sqlite3.Connection:
    """Open (creating if needed) a database whose committed rows survive kill -9 and power loss.

    The connection is shared between threads; callers serialise access with their own lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(schema)
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot open {what} {path}: {exc}") from None
    return db


#: SQLite's primary result code for "database or disk is full" (extended codes keep it in the low byte).
SQLITE_FULL = 13
#: ... and for an I/O error (a full disk sometimes shows as one, from fsync or the -shm file).
SQLITE_IOERR = 10


def is_disk_full(exc: BaseException | None) -> bool:
    """True when SQLite, or the OS under it, ran out of space (SQLITE_FULL, ENOSPC, EDQUOT).

    Follows ``__cause__``/``__context__``, so it also sees through an ``OutboxError``
    raised while handling the sqlite3 error.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF == SQLITE_FULL:
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
