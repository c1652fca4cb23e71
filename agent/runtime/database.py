"""SQLite opened the one way both ends of the alert path need: WAL and a full fsync per commit."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
import time
from pathlib import Path

from agent.errors import OutboxError

log = logging.getLogger(__name__)

PRIVATE = 0o600
#: How long a writer waits for another process's lock before SQLite says "database is locked".
BUSY_TIMEOUT_S = 5.0
#: Opening a brand-new file that another process is setting up is tried this often.
OPEN_ATTEMPTS = 5
#: SQLite's companions of a database in WAL mode; it creates them with the database's own mode.
COMPANIONS = ("-wal", "-shm", "-journal")


def open_durable(path: Path, schema: str, what: str) -> sqlite3.Connection:
    """Open (creating if needed) a database whose committed rows survive kill -9 and power loss.

    The file and its -wal/-shm companions are private (0600) whatever the umask: the database is
    created here with that mode before SQLite opens it, and SQLite gives its companions the
    database's mode. The connection is shared between threads; callers serialise access with their own lock.
    """
    for attempt in range(OPEN_ATTEMPTS):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _create_private(path)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(schema)
            return db
        except sqlite3.OperationalError as exc:
            # Two processes opening a new file at once: switching it to WAL can find it locked at once,
            # without waiting for the busy timeout. Open again shortly; anything else is an error now.
            if "locked" not in str(exc) or attempt == OPEN_ATTEMPTS - 1:
                raise OutboxError(f"cannot open {what} {path}: {exc}") from None
            time.sleep(0.05 * (attempt + 1))
        except (sqlite3.Error, OSError) as exc:
            raise OutboxError(f"cannot open {what} {path}: {exc}") from None
    raise AssertionError("unreachable")


def _create_private(path: Path) -> None:
    """Create the database file 0600, or take group and other access away from one an older version left."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE)
    os.close(fd)
    for file in (path, *(path.with_name(path.name + suffix) for suffix in COMPANIONS)):
        try:
            mode = stat.S_IMODE(file.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            try:
                os.chmod(file, mode & 0o700)
            except PermissionError as exc:  # another user's database: report, and let SQLite decide
                log.warning("cannot make %s private (mode %04o): %s", file, mode, exc.strerror)


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
