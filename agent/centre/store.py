"""The centre's durable record of accepted device messages, unique by (device, sequence).

Two backends with one behaviour: SQLite (a file, this module) and PostgreSQL (``store_postgres``),
chosen by ``[receiver] database``. Both speak the same SQL (``?`` placeholders, ``ON CONFLICT``);
each brings its own connection, transaction and schema (column types differ).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.centre import enrolment_tokens
from agent.centre.forward_queue import migrate_sqlite
from agent.centre.registry import DeviceRegistry, atomic
from agent.errors import AgentError
from agent.runtime.database import open_durable

if TYPE_CHECKING:
    from agent.config.centre import ReceiverConfig

#: The schema version this code knows; a database at a newer one is refused.
SCHEMA_VERSION = 4

_SQLITE_V1 = """
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
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    last_seen REAL,
    status TEXT NOT NULL DEFAULT 'unknown',
    missing INTEGER NOT NULL DEFAULT 0,
    last_telemetry TEXT,
    clock_skew_s REAL
);
CREATE TABLE IF NOT EXISTS device_events (
    at REAL NOT NULL,
    device TEXT NOT NULL,
    site TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL
)
"""

# Version 2: the console's records. Who handles an alert (a row appears when someone acts on it), an
# append-only audit log (triggers refuse UPDATE and DELETE), and the operators' accounts (argon2 hashes).
_SQLITE_V2 = (
    "CREATE TABLE IF NOT EXISTS alert_handling (device TEXT NOT NULL, seq INTEGER NOT NULL,"
    " state TEXT NOT NULL, taken_by TEXT, taken_at REAL, closed_by TEXT, closed_at REAL,"
    " outcome TEXT, note TEXT, PRIMARY KEY (device, seq))",
    "CREATE TABLE IF NOT EXISTS audit_log (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
    " actor TEXT NOT NULL, action TEXT NOT NULL, device TEXT, seq INTEGER, detail TEXT NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TABLE IF NOT EXISTS operators (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL,"
    " role TEXT NOT NULL, created_at REAL NOT NULL)",
)


class StoreError(AgentError, OSError):
    """The receiver's database failed (server gone, write refused): to the receiver, like a disk failing.

    An OSError, so what the receiver and the metrics do about a failing disk applies unchanged.
    """


class SchemaTooNew(AgentError, RuntimeError):
    """The database was migrated by a newer receiver: this one must not write to it."""


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
    """SQLite (WAL, full sync): an alert is on disk before the device is told the centre has it.

    The SQL here is shared with ``PostgresStore``, which overrides only opening, transactions and the schema.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()  # re-entered by every write inside a transaction()
        self._db = open_durable(self.path, "", "receiver database")
        self._migrate()

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

    def _migrations(self) -> list[Callable[[], None]]:
        """Step n brings the schema from version n to n + 1 (inside one transaction)."""
        return [
            self._sqlite_v1,
            self._sqlite_v2,
            lambda: migrate_sqlite(self._db),
            lambda: enrolment_tokens.migrate_sqlite(self._db),
        ]

    def _sqlite_v1(self) -> None:
        for statement in _SQLITE_V1.split(";"):
            self._db.execute(statement)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(devices)")}
        if "clock_skew_s" not in columns:  # a database from before clocks were watched
            self._db.execute("ALTER TABLE devices ADD COLUMN clock_skew_s REAL")

    def _sqlite_v2(self) -> None:
        for statement in _SQLITE_V2:
            self._db.execute(statement)

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, or refuse a database a newer receiver has migrated.

        An up-to-date database is only read (no write lock: the CLI can open it beside a running receiver).
        """
        migrations = self._migrations()
        if self._refuse_newer(self.schema_version(), len(migrations)):
            return
        with self.transaction():
            self._lock_schema()
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = self._db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            self._refuse_newer(current, len(migrations))
            for version in range(current, len(migrations)):
                migrations[version]()
                self._db.execute("INSERT INTO schema_version VALUES (?)", (version + 1,))

    @staticmethod
    def _refuse_newer(current: int, known: int) -> bool:
        """True if the schema is the one this code knows; SchemaTooNew if it is newer."""
        if current > known:
            raise SchemaTooNew(
                f"the receiver database is at schema version {current}, newer than this receiver knows "
                f"({known}): upgrade edge-agent, or point [receiver] database elsewhere"
            )
        return current == known

    def _lock_schema(self) -> None:
        """Keep two receivers from migrating at once (SQLite: BEGIN IMMEDIATE already does)."""

    def schema_version(self) -> int:
        """The database's schema version; 0 for a new database or one from before versions."""
        with self._lock:
            if not self._has_table("schema_version"):
                return 0
            return self._db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0

    def _has_table(self, name: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
            is not None
        )

    def registry(self, supervision_s: float) -> DeviceRegistry:
        """The fleet registry, kept in the same database."""
        return DeviceRegistry(self._db, self._lock, supervision_s, transaction=self.transaction, run_all=self.run_all)

    def find(self, device: str, seq: int) -> StoredMessage | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM messages WHERE device = ? AND seq = ?", (device, seq)).fetchone()
        return None if row is None else _message(row)

    def run_all(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[tuple]]:
        """Each statement's rows, in order; PostgreSQL sends them all before reading an answer (one round trip)."""
        with self._lock:
            return [self._db.execute(sql, args).fetchall() for sql, args in statements]

    def insert(self, claims: dict[str, Any], received_at: float) -> bool:
        """Store a message; False if (device, seq) is already there."""
        with self.transaction():
            return self.store_many([(claims, received_at)])[0][1]

    def store_many(self, messages: Sequence[tuple[dict[str, Any], float]]) -> list[tuple[str | None, bool]]:
        """Store each (claims, received_at) whose (device, seq) is free; call inside ``transaction()``.

        Returns, in order, the event id now stored under each message's (device, seq), read back by the
        statement that wrote it or looked it up (None if there is none), and whether this call stored it.
        A later message on the same (device, seq) as an earlier one in the list finds the earlier one.
        """
        written = self.run_all([(_INSERT_MESSAGE, message_row(claims, at)) for claims, at in messages])
        taken = [n for n, rows in enumerate(written) if not rows]
        found = self.run_all([(_FIND_EVENT, (messages[n][0]["device"], messages[n][0]["seq"])) for n in taken])
        stored: list[tuple[str | None, bool]] = [(rows[0][0], True) if rows else (None, False) for rows in written]
        for n, rows in zip(taken, found, strict=True):
            stored[n] = (rows[0][0] if rows else None, False)
        return stored

    def follow_chain(self, device: str, seq: int, prev: int | None, now: float) -> tuple[int | None, bool]:
        """Record what a stored message says about its predecessor: see ``follow_chains``."""
        with self.transaction():
            return self.follow_chains([(device, seq, prev, now)])[0]

    def follow_chains(self, links: Sequence[tuple[str, int, int | None, float]]) -> list[tuple[int | None, bool]]:
        """Record what stored messages (device, seq, prev, received_at) say about their predecessors.

        Returns, for each, ``(missing, filled)``: the predecessor's sequence if the centre does not have
        it (now outstanding), and whether this message itself was outstanding (a gap filled). Messages
        stored in the same transaction count as had, whatever their order.
        """
        filled = self.run_all([(_CLEAR_OUTSTANDING, (device, seq)) for device, seq, _, _ in links])
        naming = [link for link in links if link[2]]
        had = self.run_all([(_FIND_EVENT, (device, prev)) for device, _, prev, _ in naming])
        missing = {(device, prev): at for (device, _, prev, at), rows in zip(naming, had, strict=True) if not rows}
        self.run_all([(_NOTE_OUTSTANDING, (device, prev, at)) for (device, prev), at in missing.items()])
        return [
            (prev if (device, prev) in missing else None, bool(rows))
            for (device, _, prev, _), rows in zip(links, filled, strict=True)
        ]

    def outstanding(self, device: str | None = None) -> list[tuple[str, int, float]]:
        """(device, seq, noticed_at) of messages a later one named but the centre never stored."""
        query, args = "SELECT device, seq, noticed_at FROM outstanding", ()
        if device is not None:
            query, args = query + " WHERE device = ?", (device,)
        with self._lock:
            return [tuple(row) for row in self._db.execute(query + " ORDER BY device, seq", args).fetchall()]

    def prune(self, older_than: float) -> int:
        """Delete messages and device events received before ``older_than`` (Unix time): bounded retention."""
        with self.transaction():
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


_INSERT_MESSAGE = (
    # Only the (device, seq) conflict is a duplicate; any other constraint failing is an error.
    "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, seq) DO NOTHING RETURNING event_id"
)
_FIND_EVENT = "SELECT event_id FROM messages WHERE device = ? AND seq = ?"
_CLEAR_OUTSTANDING = "DELETE FROM outstanding WHERE device = ? AND seq = ? RETURNING seq"
_NOTE_OUTSTANDING = "INSERT INTO outstanding VALUES (?, ?, ?) ON CONFLICT (device, seq) DO NOTHING"


def message_row(claims: dict[str, Any], received_at: float) -> tuple:
    return (
        claims["device"],
        claims["seq"],
        claims["event_id"],
        claims["site"],
        claims["kind"],
        int(claims["test"]),
        claims["created"],
        received_at,
        json.dumps(claims),
    )


def _message(row: tuple) -> StoredMessage:
    device, seq, event_id, site, kind, test, created, received_at, claims = row
    return StoredMessage(device, seq, event_id, site, kind, bool(test), created, received_at, json.loads(claims))


def open_store(config: ReceiverConfig) -> ReceiverStore:
    """The store ``[receiver] database`` names: a PostgreSQL DSN, or an SQLite file relative to state_dir."""
    dsn = config.database_dsn
    if dsn is None:
        return ReceiverStore(config.database_path)
    from agent.centre.store_postgres import PostgresStore  # psycopg only where PostgreSQL is used

    return PostgresStore(dsn)
