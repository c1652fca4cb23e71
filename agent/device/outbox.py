"""The durable outbox: every message is on disk before anyone is told it was accepted.

SQLite in WAL mode with ``synchronous=FULL``: a committed row survives
``kill -9`` and power loss. Sequence numbers are allocated in the same
transaction as the row, so they strictly increase across restarts.

Life of a row: *pending* → handed to MQTT → broker PUBACK. Telemetry is then
deleted. Kinds the centre acknowledges stay, marked *published*, until the
centre's verified ack deletes them; if that ack does not come in time they are
requeued and sent again (the receiver de-duplicates by sequence number).

When the outbox is full, the oldest telemetry is dropped first; alerts are
never evicted and never refused. When the *disk* is full, writes on the alert
path (alerts, events, delivery progress) draw on space set aside in advance
(:mod:`agent.reserve`); telemetry never does, and is refused while the reserve
is in use. Every failure, read or write, is an :class:`OutboxError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.device.reserve import RELEASE_STEP, SequenceFloor, SpaceReserve, free_bytes
from agent.errors import OutboxError
from agent.runtime.database import SQLITE_IOERR, is_disk_full, open_durable

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
-- awaiting_ack() is asked on every delivery step: count only the (few) rows in the ack window.
CREATE INDEX IF NOT EXISTS outbox_awaiting_ack ON outbox (seq) WHERE needs_ack = 1 AND published_at IS NOT NULL;
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
    """A durable, ordered queue of messages waiting for the broker and the centre.

    Args:
        path: the SQLite file; the reserve (``<name>.reserve``) and the sequence floor
            (``<name>.seq``) live next to it, on the same filesystem.
        capacity: messages held; telemetry is dropped first beyond it.
        reserve_bytes: disk space set aside for alert-path writes when the disk is full; 0: none (and
            a ballast left from before is removed). None, for a second opener such as selftest: the
            agent's ballast is neither grown, given back nor removed.
    """

    def __init__(self, path: Path, capacity: int = 10_000, reserve_bytes: int | None = None):
        self.path = Path(path)
        self.capacity = capacity
        self.dropped_telemetry = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.reserve = SpaceReserve(self.path.with_name(self.path.name + ".reserve"), reserve_bytes or 0)
        self._reserve_problem = ""
        self._floor = SequenceFloor(self.path.with_name(self.path.name + ".seq"))
        self._last_seq = self._read_floor(0)
        self._db = self._open()
        if reserve_bytes is not None:
            self.maintain_reserve(force=True)

    def __repr__(self) -> str:
        return f"<Outbox {self.path} reserve={self.reserve.held}/{self.reserve.size}>"

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Space.

    def _open(self) -> sqlite3.Connection:
        """Open the database; on a full disk (a restart while it is full), first give back some reserve."""
        while True:
            try:
                return open_durable(self.path, _SCHEMA, "outbox")
            except OutboxError as exc:
                if not (self._out_of_space(exc.__cause__ or exc.__context__) and self._release()):
                    raise

    def _release(self) -> int:
        try:
            return self.reserve.release_step()
        except OSError as exc:
            log.error("cannot give back the outbox reserve %s: %s", self.reserve.path, exc)
            return 0

    def _out_of_space(self, exc: BaseException | None) -> bool:
        if is_disk_full(exc):
            return True
        code = getattr(exc, "sqlite_errorcode", None)
        if not isinstance(code, int) or code & 0xFF != SQLITE_IOERR:
            return False
        try:  # an I/O error on a filesystem with no room left is a full disk by another name
            return free_bytes(self.path.parent) < RELEASE_STEP
        except OSError:
            return False

    def maintain_reserve(self, force: bool = False) -> None:
        """Grow the reserve back where the disk has room again (called often; checks every few seconds)."""
        if not (force or self.reserve.regrow_due()):
            return
        was_in_use = self.reserve.in_use
        try:
            self.reserve.top_up()
        except OSError as exc:  # not a full disk (that is no error here): say it once, not every few seconds
            if str(exc) != self._reserve_problem:
                log.warning("cannot set disk space aside in %s: %s", self.reserve.path, exc)
            self._reserve_problem = str(exc)
        if self.reserve.in_use and force:
            log.warning(
                "only %d of %d KiB could be set aside for alerts in %s: the disk is nearly full",
                self.reserve.held // 1024,
                self.reserve.size // 1024,
                self.reserve.path,
            )
        elif was_in_use and not self.reserve.in_use and not force:  # not the first setting aside, at start
            log.info("disk space for alerts set aside again (%d KiB)", self.reserve.size // 1024)

    # Writes.

    def _transaction(self, work: Callable[[sqlite3.Connection], Any], use_reserve: bool = True) -> Any:
        """Run ``work`` in one transaction; on a full disk, give back a reserve step and try again."""
        with self._lock:
            while True:
                try:
                    return self._run(work)
                except sqlite3.Error as exc:
                    if use_reserve and self._out_of_space(exc) and self._release():
                        continue
                    raise OutboxError(f"outbox {self.path}: {exc}") from exc

    def _run(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            result = work(self._db)
            self._db.execute("COMMIT")
            return result
        except BaseException:
            if self._db.in_transaction:  # SQLite rolls back by itself on SQLITE_FULL
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

    def _read_floor(self, fallback: int) -> int:
        try:
            return self._floor.read()
        except OSError as exc:
            log.error("%s; using the last sequence number this process knows", exc)
            return fallback

    def _allocate_sequence(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
        seq = max(row[0] if row else 0, self._read_floor(self._last_seq)) + 1
        db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('seq', ?)", (seq,))
        self._last_seq = max(self._last_seq, seq)
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
        """Allocate a sequence number for a message that is not queued (status, last will, a press held in memory).

        From the database while it takes writes, but never from the reserve (that is for
        alerts); otherwise from the sequence floor, which needs no new space.
        """
        if not self.reserve.in_use:
            try:
                return self._transaction(self._allocate_sequence, use_reserve=False)
            except OutboxError as exc:
                log.debug("sequence number from the floor file: %s", exc)
        with self._lock:
            try:
                row = self._db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
            except sqlite3.Error:
                row = None  # then what this process allocated last, and the floor, are all there is
            counter = row[0] if row else 0
            seq = max(counter, self._last_seq, self._read_floor(self._last_seq)) + 1
            try:
                self._floor.raise_to(seq)
            except OSError as exc:
                raise OutboxError(f"cannot record sequence number {seq} in {self._floor.path}: {exc}") from exc
            self._last_seq = seq
            return seq

    def add(self, kind: str, needs_ack: bool, build_claims: Callable[[int], dict[str, Any]]) -> OutboxEntry | None:
        """Commit a new message durably; returns None only for telemetry dropped when full.

        ``build_claims(seq)`` makes the claim set once the sequence number is known.
        Telemetry is refused (OutboxError) while the disk-full reserve is in use.
        """
        self._refuse_telemetry_on_full_disk(kind, needs_ack)

        def work(db: sqlite3.Connection) -> OutboxEntry | None:
            if not self._make_room(db, needs_ack):
                return None
            seq = self._allocate_sequence(db)
            claims = build_claims(seq)
            if needs_ack:
                claims["prev"] = self._chain(db, seq)
            return self._insert(db, kind, needs_ack, claims)

        return self._transaction(work, use_reserve=needs_ack)

    def store(self, kind: str, needs_ack: bool, claims: dict[str, Any]) -> OutboxEntry | None:
        """Commit a message whose sequence number came from :meth:`next_sequence` (a press held in memory)."""
        self._refuse_telemetry_on_full_disk(kind, needs_ack)

        def work(db: sqlite3.Connection) -> OutboxEntry | None:
            if not self._make_room(db, needs_ack):
                return None
            row = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
            if row is None or row[0] < claims["seq"]:
                db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES ('seq', ?)", (claims["seq"],))
            return self._insert(db, kind, needs_ack, claims)

        return self._transaction(work, use_reserve=needs_ack)

    def _refuse_telemetry_on_full_disk(self, kind: str, needs_ack: bool) -> None:
        if not needs_ack and self.reserve.in_use:
            raise OutboxError(f"disk full: the space left in {self.path.parent} is kept for alerts; {kind} not stored")

    def _make_room(self, db: sqlite3.Connection, needs_ack: bool) -> bool:
        """Capacity: drop the oldest telemetry for a new message; False when this telemetry is dropped itself."""
        (depth,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        if depth < self.capacity:
            return True
        oldest = db.execute("SELECT seq FROM outbox WHERE needs_ack = 0 ORDER BY seq LIMIT 1").fetchone()
        if oldest is not None:
            db.execute("DELETE FROM outbox WHERE seq = ?", oldest)
            self.dropped_telemetry += 1
        elif not needs_ack:
            self.dropped_telemetry += 1
            return False
        else:
            log.warning("outbox %s holds %d alerts, over its capacity of %d", self.path, depth, self.capacity)
        return True

    @staticmethod
    def _insert(db: sqlite3.Connection, kind: str, needs_ack: bool, claims: dict[str, Any]) -> OutboxEntry:
        db.execute(
            "INSERT INTO outbox (seq, event_id, kind, needs_ack, claims, created) VALUES (?, ?, ?, ?, ?, ?)",
            (claims["seq"], claims["event_id"], kind, int(needs_ack), json.dumps(claims), claims["created"]),
        )
        return OutboxEntry(claims["seq"], claims["event_id"], kind, needs_ack, claims, claims["created"], None, 0)

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

    # Reads: every sqlite3 error becomes an OutboxError.

    def _read(self, query: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(query, args).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot read: {exc}") from exc

    def awaiting_ack(self) -> int:
        """Messages the broker took that the centre has not acknowledged yet."""
        return self._read("SELECT COUNT(*) FROM outbox WHERE needs_ack = 1 AND published_at IS NOT NULL")[0][0]

    def unpublished(self, limit: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[OutboxEntry]:
        """Oldest rows not yet confirmed by the broker, in sequence order."""
        rows = self._read(
            "SELECT * FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT ?", (limit + len(exclude),)
        )
        return [entry for entry in map(_entry, rows) if entry.seq not in exclude][:limit]

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
        return self._read("SELECT COUNT(*) FROM outbox")[0][0]

    def oldest_age_s(self) -> float | None:
        ((oldest,),) = self._read("SELECT MIN(created) FROM outbox")
        return None if oldest is None else max(0.0, time.time() - oldest)

    def entries(self) -> list[OutboxEntry]:
        return [_entry(row) for row in self._read("SELECT * FROM outbox ORDER BY seq")]


def _entry(row: tuple) -> OutboxEntry:
    seq, event_id, kind, needs_ack, claims, created, published_at, attempts = row
    return OutboxEntry(seq, event_id, kind, bool(needs_ack), json.loads(claims), created, published_at, attempts)
