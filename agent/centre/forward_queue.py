"""The forwarding outbox in the receiver's database: what each ARC still has to acknowledge.

A row is written in the same transaction as the message (or device event) it forwards, so it
commits with it or not at all, and it is marked delivered only when the ARC's ACK for it arrives.
Rows are sent per account in the order they were written. Each row keeps the DC-09 sequence number
it was first sent under, so a copy sent again after a lost ACK (or a restart) is recognisably the
same message. One row per ARC in ``forward_arcs`` holds the sequence counter, the lease (only one
receiver sends for an ARC at a time, however many share the database) and the state operators see.

The schema is one migration step (``migrate_sqlite`` / ``migrate_postgres``) after the store's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

SQLITE_FORWARD_QUEUE = """
CREATE TABLE IF NOT EXISTS forward_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    arc TEXT NOT NULL,
    source TEXT NOT NULL,
    account TEXT NOT NULL,
    protocol TEXT NOT NULL,
    data TEXT NOT NULL,
    what TEXT NOT NULL,
    queued_at REAL NOT NULL,
    dc09_seq INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    delivered_at REAL,
    UNIQUE (arc, source)
);
CREATE INDEX IF NOT EXISTS forward_pending ON forward_queue (arc, id) WHERE delivered_at IS NULL;
CREATE TABLE IF NOT EXISTS forward_arcs (
    arc TEXT PRIMARY KEY,
    seq INTEGER NOT NULL DEFAULT 0,
    holder TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    connected INTEGER NOT NULL DEFAULT 0,
    path TEXT,
    last_ack_at REAL,
    last_nak_at REAL,
    last_nak TEXT,
    fault TEXT,
    updated_at REAL
)
"""

POSTGRES_FORWARD_QUEUE = """
CREATE TABLE IF NOT EXISTS forward_queue (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    arc TEXT NOT NULL,
    source TEXT NOT NULL,
    account TEXT NOT NULL,
    protocol TEXT NOT NULL,
    data TEXT NOT NULL,
    what TEXT NOT NULL,
    queued_at DOUBLE PRECISION NOT NULL,
    dc09_seq INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    delivered_at DOUBLE PRECISION,
    UNIQUE (arc, source)
);
CREATE INDEX IF NOT EXISTS forward_pending ON forward_queue (arc, id) WHERE delivered_at IS NULL;
CREATE TABLE IF NOT EXISTS forward_arcs (
    arc TEXT PRIMARY KEY,
    seq INTEGER NOT NULL DEFAULT 0,
    holder TEXT,
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    connected INTEGER NOT NULL DEFAULT 0,
    path TEXT,
    last_ack_at DOUBLE PRECISION,
    last_nak_at DOUBLE PRECISION,
    last_nak TEXT,
    fault TEXT,
    updated_at DOUBLE PRECISION
)
"""


def migrate_sqlite(db: Any) -> None:
    """Migration step: the forwarding outbox (SQLite)."""
    for statement in SQLITE_FORWARD_QUEUE.split(";"):
        db.execute(statement)


def migrate_postgres(db: Any) -> None:
    """Migration step: the forwarding outbox (PostgreSQL)."""
    db.execute(POSTGRES_FORWARD_QUEUE)


@dataclass(frozen=True)
class Forward:
    """One event on its way to one ARC: the DC-09 data (inside ``[#acct|…]``) and a line for operators."""

    arc: str
    source: str  # unique per ARC: the same message is never queued twice
    account: str
    protocol: str  # ADM-CID / SIA-DCS
    data: str
    what: str


@dataclass(frozen=True)
class QueuedForward:
    id: int
    account: str
    protocol: str
    data: str
    what: str
    queued_at: float
    dc09_seq: int | None
    attempts: int
    next_at: float


@dataclass(frozen=True)
class ArcStatus:
    """What ``receiver forwarders`` and the metrics show for one ARC."""

    arc: str
    connected: bool
    path: str | None
    depth: int
    oldest_queued_at: float | None
    last_ack_at: float | None
    last_nak_at: float | None
    last_nak: str | None
    fault: str | None
    holder: str | None
    lease_until: float


_ENQUEUE = (
    "INSERT INTO forward_queue (arc, source, account, protocol, data, what, queued_at, next_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT (arc, source) DO NOTHING"
)
_PENDING = (
    "SELECT id, account, protocol, data, what, queued_at, dc09_seq, attempts, next_at FROM forward_queue"
    " WHERE arc = ? AND delivered_at IS NULL{skip} ORDER BY id LIMIT ?"
)
_NEXT_SEQ = "UPDATE forward_arcs SET seq = CASE WHEN seq >= 9999 THEN 1 ELSE seq + 1 END WHERE arc = ? RETURNING seq"
_SET_SEQ = "UPDATE forward_queue SET dc09_seq = ? WHERE id = ?"
_STATUS = (
    "SELECT a.arc, a.connected, a.path, a.last_ack_at, a.last_nak_at, a.last_nak, a.fault, a.holder, a.lease_until,"
    " (SELECT count(*) FROM forward_queue q WHERE q.arc = a.arc AND q.delivered_at IS NULL),"
    " (SELECT min(queued_at) FROM forward_queue q WHERE q.arc = a.arc AND q.delivered_at IS NULL)"
    " FROM forward_arcs a ORDER BY a.arc"
)


class ForwardQueue:
    """The forwarding tables, through the receiver's store (its connection, lock and transactions)."""

    def __init__(self, store: Any):
        self.store = store  # ReceiverStore or PostgresStore: run_all() and transaction()

    def enqueue(self, forwards: Sequence[Forward], now: float) -> None:
        """Queue events: call inside the transaction that stores what they forward."""
        if forwards:
            self.store.run_all(
                [(_ENQUEUE, (f.arc, f.source, f.account, f.protocol, f.data, f.what, now)) for f in forwards]
            )

    def register(self, arc: str) -> None:
        self._write([("INSERT INTO forward_arcs (arc) VALUES (?) ON CONFLICT (arc) DO NOTHING", (arc,))])

    def claim(self, arc: str, holder: str, now: float, lease_s: float) -> bool:
        """Take (or keep) the right to send for ``arc``; False while another receiver holds it."""
        rows = self._write(
            [
                (
                    "UPDATE forward_arcs SET holder = ?, lease_until = ? WHERE arc = ?"
                    " AND (holder IS NULL OR holder = ? OR lease_until < ?) RETURNING arc",
                    (holder, now + lease_s, arc, holder, now),
                )
            ]
        )
        return bool(rows[0])

    def release(self, arc: str, holder: str) -> None:
        self._write([("UPDATE forward_arcs SET lease_until = 0 WHERE arc = ? AND holder = ?", (arc, holder))])

    def pending(self, arc: str, skip_accounts: Sequence[str], limit: int = 100) -> list[QueuedForward]:
        """The oldest undelivered rows, leaving out accounts whose head must wait (in id order)."""
        skip = f" AND account NOT IN ({', '.join('?' * len(skip_accounts))})" if skip_accounts else ""
        rows = self.store.run_all([(_PENDING.format(skip=skip), (arc, *skip_accounts, limit))])[0]
        return [QueuedForward(*row) for row in rows]

    def next_seq(self, arc: str) -> int:
        """The next DC-09 sequence number for ``arc`` (0001-9999, then 0001 again), kept in the database."""
        with self.store.transaction():
            return int(self.store.run_all([(_NEXT_SEQ, (arc,))])[0][0][0])

    def assign_seqs(self, arc: str, rows: Sequence[QueuedForward]) -> list[QueuedForward]:
        """Give rows never sent their sequence numbers (one commit for all); each keeps its number for every copy."""
        fresh = [row for row in rows if row.dc09_seq is None]
        if not fresh:
            return list(rows)
        with self.store.transaction():
            seqs = [int(answer[0][0]) for answer in self.store.run_all([(_NEXT_SEQ, (arc,))] * len(fresh))]
            self.store.run_all([(_SET_SEQ, (seq, row.id)) for seq, row in zip(seqs, fresh, strict=True)])
        assigned = {row.id: seq for seq, row in zip(seqs, fresh, strict=True)}
        return [replace(row, dc09_seq=assigned[row.id]) if row.id in assigned else row for row in rows]

    def delivered(self, arc: str, row_id: int, now: float) -> None:
        """The ARC acknowledged the row: it is done (kept for the record until retention)."""
        self._write(
            [
                ("UPDATE forward_queue SET delivered_at = ?, last_error = NULL WHERE id = ?", (now, row_id)),
                ("UPDATE forward_arcs SET last_ack_at = ?, updated_at = ? WHERE arc = ?", (now, now, arc)),
            ]
        )

    def failed(self, row_id: int, error: str, next_at: float) -> None:
        """An attempt that got no ACK: counted, with why, and not tried again before ``next_at``."""
        self._write(
            [
                (
                    "UPDATE forward_queue SET attempts = attempts + 1, last_error = ?, next_at = ? WHERE id = ?",
                    (error[:300], next_at, row_id),
                )
            ]
        )

    def note_state(self, arc: str, now: float, **fields: Any) -> None:
        """Record what operators see: connected, path, last_ack_at, last_nak_at, last_nak, fault."""
        names = ", ".join(f"{name} = ?" for name in fields)
        self._write([(f"UPDATE forward_arcs SET {names}, updated_at = ? WHERE arc = ?", (*fields.values(), now, arc))])

    def status(self) -> list[ArcStatus]:
        rows = self.store.run_all([(_STATUS, ())])[0]
        return [
            ArcStatus(arc, bool(connected), path, depth, oldest, ack, nak_at, nak, fault, holder, lease)
            for arc, connected, path, ack, nak_at, nak, fault, holder, lease, depth, oldest in rows
        ]

    def rows(self, arc: str) -> list[tuple]:
        """Every row for ``arc`` in order: (id, account, data, dc09_seq, attempts, delivered_at, last_error)."""
        sql = (
            "SELECT id, account, data, dc09_seq, attempts, delivered_at, last_error"
            " FROM forward_queue WHERE arc = ? ORDER BY id"
        )
        return [tuple(row) for row in self.store.run_all([(sql, (arc,))])[0]]

    def prune(self, arc: str, older_than: float) -> None:
        """Forget rows the ARC acknowledged before ``older_than`` (the receiver's retention)."""
        self._write([("DELETE FROM forward_queue WHERE arc = ? AND delivered_at < ?", (arc, older_than))])

    def _write(self, statements: list[tuple[str, tuple]]) -> list[list[tuple]]:
        with self.store.transaction():
            return self.store.run_all(statements)
