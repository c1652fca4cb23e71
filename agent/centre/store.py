"""The centre's durable record of accepted device messages, unique by (device, sequence)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.centre.registry import DeviceRegistry, atomic
from agent.runtime.database import open_durable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    test INTEGER NOT NULL,
    created REAL NOT NULL,
    received_at REAL NOT NULL,
    claims TEXT NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE INDEX IF NOT EXISTS messages_by_kind ON messages (kind, received_at);
CREATE TABLE IF NOT EXISTS outstanding (
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    noticed_at REAL NOT NULL,
    PRIMARY KEY (device, seq)
);
"""


@dataclass(frozen=True)
class StoredMessage:
    device: str
    seq: int
    event_id: str
    site: str
    kind: str
    test: bool
    created: float
    received_at: float
    claims: dict[str, Any]


class ReceiverStore:
    """SQLite (WAL, full sync): an alert is on disk before the device is told the centre has it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()  # re-entered by every write inside a transaction()
        self._db = open_durable(self.path, _SCHEMA, "receiver database")

    def __enter__(self) -> ReceiverStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything written inside (messages, registry, chain) is committed together, with one fsync.

        If anything inside raises, or the commit fails, none of it is kept and the exception
        propagates. Other threads wait for the whole transaction; nested use joins the outer one.
        """
        with atomic(self._db, self._lock):
            yield

    def registry(self, supervision_s: float) -> DeviceRegistry:
        """The fleet registry, kept in the same database."""
        return DeviceRegistry(self._db, self._lock, supervision_s)

    def find(self, device: str, seq: int) -> StoredMessage | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM messages WHERE device = ? AND seq = ?", (device, seq)).fetchone()
        return None if row is None else _message(row)

    def insert(self, claims: dict[str, Any], received_at: float) -> bool:
        """Store a message; False if (device, seq) is already there."""
        with self._lock:
            cursor = self._db.execute(
                # Only the (device, seq) conflict is a duplicate; any other constraint failing is an error.
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, seq) DO NOTHING",
                (
                    claims["device"],
                    claims["seq"],
                    claims["event_id"],
                    claims["site"],
                    claims["kind"],
                    int(claims["test"]),
                    claims["created"],
                    received_at,
                    json.dumps(claims),
                ),
            )
            return cursor.rowcount == 1

    def follow_chain(self, device: str, seq: int, prev: int | None, now: float) -> tuple[int | None, bool]:
        """Record what a stored message says about its predecessor.

        Returns ``(missing, filled)``: the predecessor's sequence if the centre does not have it (now
        outstanding), and whether this message itself was outstanding (a gap filled).
        """
        with self._lock:
            filled = self._db.execute("DELETE FROM outstanding WHERE device = ? AND seq = ?", (device, seq)).rowcount
            if not prev:
                return None, bool(filled)
            have = self._db.execute("SELECT 1 FROM messages WHERE device = ? AND seq = ?", (device, prev)).fetchone()
            if have is not None:
                return None, bool(filled)
            self._db.execute(
                "INSERT INTO outstanding VALUES (?, ?, ?) ON CONFLICT (device, seq) DO NOTHING", (device, prev, now)
            )
        return prev, bool(filled)

    def outstanding(self, device: str | None = None) -> list[tuple[str, int, float]]:
        """(device, seq, noticed_at) of messages a later one named but the centre never stored."""
        query, args = "SELECT device, seq, noticed_at FROM outstanding", ()
        if device is not None:
            query, args = query + " WHERE device = ?", (device,)
        with self._lock:
            return self._db.execute(query + " ORDER BY device, seq", args).fetchall()

    def prune(self, older_than: float) -> int:
        """Delete messages and device events received before ``older_than`` (Unix time): bounded retention."""
        with self._lock:
            removed = self._db.execute("DELETE FROM messages WHERE received_at < ?", (older_than,)).rowcount
            removed += self._db.execute("DELETE FROM device_events WHERE at < ?", (older_than,)).rowcount
        return removed

    def messages(self, kind: str | None = None, device: str | None = None) -> list[StoredMessage]:
        query, args = "SELECT * FROM messages WHERE 1=1", []
        if kind is not None:
            query, args = query + " AND kind = ?", [*args, kind]
        if device is not None:
            query, args = query + " AND device = ?", [*args, device]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created, device, seq", args).fetchall()
        return [_message(row) for row in rows]


def _message(row: tuple) -> StoredMessage:
    device, seq, event_id, site, kind, test, created, received_at, claims = row
    return StoredMessage(device, seq, event_id, site, kind, bool(test), created, received_at, json.loads(claims))
