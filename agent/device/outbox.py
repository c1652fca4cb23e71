"""The durable outbox: every message is on disk before anyone is told it was accepted.

SQLite in WAL mode with ``synchronous=FULL``: a committed row survives
``kill -9`` and power loss. Sequence numbers are allocated in the same
transaction as the row, so they strictly increase across restarts.

Life of a row: *pending* → handed to MQTT → broker PUBACK. Telemetry is then
deleted. Kinds the centre acknowledges stay, marked *published*, until the
centre's verified ack deletes them; if that ack does not come in time they are
requeued and sent again (the receiver de-duplicates by sequence number).

When the outbox is full, the oldest telemetry is dropped first; alerts are
never evicted and never refused.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import OutboxError
from agent.runtime.database import open_durable

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    needs_ack INTEGER NOT NULL,
    claims TEXT NOT NULL,
    created REAL NOT NULL,
    published_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
"""


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    event_id: str
    kind: str
    needs_ack: bool
    claims: dict[str, Any]
    created: float
    published_at: float | None
    attempts: int


class Outbox:
    """A durable, ordered queue of messages waiting for the broker and the centre."""

    def __init__(self, path: Path, capacity: int = 10_000):
        self.path = Path(path)
        self.capacity = capacity
        self.dropped_telemetry = 0
        self._lock = threading.Lock()
        self._db = open_durable(self.path, _SCHEMA, "outbox")

    def __repr__(self) -> str:
        return f"<Outbox {self.path} depth={self.depth()}>"

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: {exc}") from None

    @staticmethod
    def _allocate_sequence(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
        seq = (row[0] if row else 0) + 1
        db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('seq', ?)", (seq,))
        return seq

    @staticmethod
    def _chain(db: sqlite3.Connection, seq: int) -> int:
        """The sequence of the previous message the centre must acknowledge (0 for the first), and move on.

        Each alert names its predecessor, so the centre can tell "seq 7 is missing" from "seq 7 was
        telemetry, dropped when the outbox was full" without knowing what the device sent in between.
        """
        row = db.execute("SELECT value FROM counters WHERE name = 'chain'").fetchone()
        db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('chain', ?)", (seq,))
        return row[0] if row else 0

    def next_sequence(self) -> int:
        """Allocate a sequence number for a message that is not queued (status, last will)."""
        return self._transaction(self._allocate_sequence)

    def add(self, kind: str, needs_ack: bool, build_claims: Callable[[int], dict[str, Any]]) -> OutboxEntry | None:
        """Commit a new message durably; returns None only for telemetry dropped when full.

        ``build_claims(seq)`` makes the claim set once the sequence number is known.
        """

        def work(db: sqlite3.Connection) -> OutboxEntry | None:
            (depth,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if depth >= self.capacity:
                oldest = db.execute("SELECT seq FROM outbox WHERE needs_ack = 0 ORDER BY seq LIMIT 1").fetchone()
                if oldest is not None:
                    db.execute("DELETE FROM outbox WHERE seq = ?", oldest)
                    self.dropped_telemetry += 1
                elif not needs_ack:
                    self.dropped_telemetry += 1
                    return None
                else:
                    log.warning("outbox %s holds %d alerts, over its capacity of %d", self.path, depth, self.capacity)
            seq = self._allocate_sequence(db)
            claims = build_claims(seq)
            if needs_ack:
                claims["prev"] = self._chain(db, seq)
            db.execute(
                "INSERT INTO outbox (seq, event_id, kind, needs_ack, claims, created) VALUES (?, ?, ?, ?, ?, ?)",
                (seq, claims["event_id"], kind, int(needs_ack), json.dumps(claims), claims["created"]),
            )
            return OutboxEntry(seq, claims["event_id"], kind, needs_ack, claims, claims["created"], None, 0)

        return self._transaction(work)

    def unpublished(self, limit: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[OutboxEntry]:
        """Oldest rows not yet confirmed by the broker, in sequence order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT ?", (limit + len(exclude),)
            ).fetchall()
        return [entry for entry in map(_entry, rows) if entry.seq not in exclude][:limit]

    def mark_published(self, seq: int) -> OutboxEntry | None:
        """The broker has it: delete telemetry, keep acknowledged kinds until the centre's ack."""

        def work(db: sqlite3.Connection) -> OutboxEntry | None:
            row = db.execute("SELECT * FROM outbox WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return None
            if row[3]:
                db.execute(
                    "UPDATE outbox SET published_at = ?, attempts = attempts + 1 WHERE seq = ?", (time.time(), seq)
                )
            else:
                db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            return _entry(row)

        return self._transaction(work)

    def acknowledge(self, seq: int, event_id: str) -> OutboxEntry | None:
        """The centre has it: remove the row if sequence and event id both match."""

        def work(db: sqlite3.Connection) -> OutboxEntry | None:
            row = db.execute("SELECT * FROM outbox WHERE seq = ? AND event_id = ?", (seq, event_id)).fetchone()
            if row is not None:
                db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            return None if row is None else _entry(row)

        return self._transaction(work)

    def requeue_unacknowledged(self, older_than_s: float) -> int:
        """Send again what the broker took but the centre has not acknowledged in time."""
        cutoff = time.time() - older_than_s
        return self._transaction(
            lambda db: (
                db.execute(
                    "UPDATE outbox SET published_at = NULL WHERE published_at IS NOT NULL AND published_at < ?",
                    (cutoff,),
                ).rowcount
            )
        )

    def is_responsive(self, timeout_s: float = 1.0) -> bool:
        """True when the database answers within ``timeout_s`` (for the watchdog; never blocks longer)."""
        if not self._lock.acquire(timeout=timeout_s):
            return False
        try:
            self._db.execute("SELECT 1").fetchone()
            return True
        except sqlite3.Error:
            return False
        finally:
            self._lock.release()

    def depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def oldest_age_s(self) -> float | None:
        with self._lock:
            (oldest,) = self._db.execute("SELECT MIN(created) FROM outbox").fetchone()
        return None if oldest is None else max(0.0, time.time() - oldest)

    def entries(self) -> list[OutboxEntry]:
        with self._lock:
            return [_entry(row) for row in self._db.execute("SELECT * FROM outbox ORDER BY seq").fetchall()]


def _entry(row: tuple) -> OutboxEntry:
    seq, event_id, kind, needs_ack, claims, created, published_at, attempts = row
    return OutboxEntry(seq, event_id, kind, bool(needs_ack), json.loads(claims), created, published_at, attempts)
