"""SQLite opened the one way both ends of the alert path need: WAL and a full fsync per commit."""

from __future__ import annotations

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
