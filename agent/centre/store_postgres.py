"""The receiver's store on PostgreSQL: the same behaviour as the SQLite store, on a server.

The SQL is the SQLite store's, except where a batch is written: there each step (messages, chains,
device rows) is one statement over the whole batch, sent as one JSON parameter (``jsonb_to_recordset``),
because every statement costs the receiver's one Python thread far more through psycopg than through
sqlite3. The shared tests hold both to the same results, row by row.

Chosen by ``[receiver] database = "postgresql://…"``. One connection, guarded by the store's lock
(the receiver has one worker writing; metrics and the CLI read): ``transaction()`` is one PostgreSQL
transaction, committed with ``synchronous_commit = on`` so an acknowledged message is on the server's
disk. A connection lost between transactions is opened again by the next transaction; one lost
inside a transaction fails that transaction (its messages are not acknowledged and come again).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from agent.centre import enrolment_tokens
from agent.centre.forward_queue import migrate_postgres
from agent.centre.registry import HEARD_UPDATE, DeviceRegistry, DeviceWrite
from agent.centre.store import ReceiverStore, StoreError, message_row

#: Held (per transaction) while migrating, so two receivers starting together do not both migrate.
SCHEMA_LOCK_KEY = 0x6564676541  # "edgeA"

_POSTGRES_V1 = """
CREATE TABLE IF NOT EXISTS messages (
    device TEXT NOT NULL,
    seq BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    test INTEGER NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    claims TEXT NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE INDEX IF NOT EXISTS messages_by_kind ON messages (kind, received_at);
CREATE INDEX IF NOT EXISTS messages_by_age ON messages (received_at);
CREATE TABLE IF NOT EXISTS outstanding (
    device TEXT NOT NULL,
    seq BIGINT NOT NULL,
    noticed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    last_seen DOUBLE PRECISION,
    status TEXT NOT NULL DEFAULT 'unknown',
    missing INTEGER NOT NULL DEFAULT 0,
    last_telemetry TEXT,
    clock_skew_s DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS device_events (
    at DOUBLE PRECISION NOT NULL,
    device TEXT NOT NULL,
    site TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS device_events_by_age ON device_events (at)
"""

# Version 2: the console's records (see store._SQLITE_V2), and a NOTIFY on every commit that changes
# what a console shows, so consoles update from the database itself, whoever wrote.
_POSTGRES_V2 = """
CREATE TABLE IF NOT EXISTS alert_handling (
    device TEXT NOT NULL,
    seq BIGINT NOT NULL,
    state TEXT NOT NULL,
    taken_by TEXT,
    taken_at DOUBLE PRECISION,
    closed_by TEXT,
    closed_at DOUBLE PRECISION,
    outcome TEXT,
    note TEXT,
    PRIMARY KEY (device, seq)
);
CREATE TABLE IF NOT EXISTS audit_log (
    id BIGSERIAL PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    device TEXT,
    seq BIGINT,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE OR REPLACE FUNCTION edge_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION edge_audit_append_only();
CREATE OR REPLACE FUNCTION edge_console_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('edge_console', TG_TABLE_NAME);
    RETURN NULL;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS messages_notify ON messages;
CREATE TRIGGER messages_notify AFTER INSERT ON messages FOR EACH STATEMENT EXECUTE FUNCTION edge_console_notify();
DROP TRIGGER IF EXISTS devices_notify ON devices;
CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE ON devices
    FOR EACH STATEMENT EXECUTE FUNCTION edge_console_notify();
DROP TRIGGER IF EXISTS alert_handling_notify ON alert_handling;
CREATE TRIGGER alert_handling_notify AFTER INSERT OR UPDATE ON alert_handling
    FOR EACH STATEMENT EXECUTE FUNCTION edge_console_notify();
"""


class PostgresConnection:
    """A psycopg connection that speaks the stores' SQL (``?`` placeholders) and fails with StoreError."""

    def __init__(self, dsn: str):
        self._dsn = dsn
        self.in_transaction = False
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
            conn.execute("SET synchronous_commit TO on")  # whatever the server's default: a commit is on disk
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to the receiver database: {exc}") from None
        return conn

    def execute(self, sql: str, args: Sequence[Any] | None = None) -> psycopg.Cursor:
        if self._conn.closed and not self.in_transaction:  # the server went away between transactions
            self._conn = self._connect()
        try:
            return self._conn.execute(sql.replace("?", "%s"), args)
        except psycopg.Error as exc:
            raise StoreError(f"receiver database: {exc}") from exc

    def execute_all(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[tuple]]:
        """Each statement's rows, in order: all sent before any answer is read (psycopg's pipeline mode).

        A single statement goes on its own: psycopg's pipeline is Python code, and costs twice the CPU
        of a plain round trip.
        """
        if not statements:
            return []
        if len(statements) == 1:
            cursor = self.execute(*statements[0])
            return [cursor.fetchall() if cursor.description else []]
        if self._conn.closed and not self.in_transaction:
            self._conn = self._connect()
        try:
            with self._conn.pipeline():
                cursors = [self._execute_run(sql, [args for _, args in run]) for sql, run in _runs(statements)]
            return [rows for cursor in cursors for rows in _each_result(cursor)]
        except psycopg.Error as exc:
            raise StoreError(f"receiver database: {exc}") from exc

    def _execute_run(self, sql: str, args: list[Sequence[Any]]) -> psycopg.Cursor:
        """One statement run with one or many argument rows: with many, psycopg sends it once, not once a row."""
        if len(args) == 1:
            return self._conn.execute(sql.replace("?", "%s"), args[0])
        cursor = self._conn.cursor()
        cursor.executemany(sql.replace("?", "%s"), args, returning=True)
        return cursor

    def begin(self) -> None:
        """BEGIN; on a connection found dead just now, once more on a new one (nothing was sent on it yet)."""
        try:
            self.execute("BEGIN")
        except StoreError:
            if not self._conn.closed:
                raise
            self.execute("BEGIN")
        self.in_transaction = True

    def commit(self) -> None:
        """COMMIT, or StoreError: a transaction in which a statement failed is rolled back, never reported kept."""
        if self._conn.info.transaction_status != TransactionStatus.INTRANS:
            raise StoreError("receiver database: the transaction failed and was rolled back")
        status = self.execute("COMMIT").statusmessage
        self.in_transaction = False
        if status != "COMMIT":
            raise StoreError(f"receiver database: COMMIT answered {status!r}")

    def rollback(self) -> None:
        self.in_transaction = False
        if self._conn.closed:
            return
        with suppress(psycopg.Error):
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()


class PostgresRegistry(DeviceRegistry):
    """The registry on PostgreSQL: a batch's device rows in two statements, not two for each device."""

    def _write(self, writes: Sequence[DeviceWrite]) -> list[bool]:
        devices = [write.sighting.claims.device for write in writes]
        if not writes or not all(write.alive for write in writes) or len(set(devices)) < len(devices):
            return super()._write(writes)  # an offline or a device twice: row by row, in order
        rows = [_heard_row(write) for write in writes]
        flipped, _ = self._run_all(
            [(_FLIP_BACK_MANY, (json.dumps([{"device": d} for d in devices]),)), (_HEARD_MANY, (json.dumps(rows),))]
        )
        back = {device for (device,) in flipped}
        return [device in back for device in devices]


def _heard_row(write: DeviceWrite) -> dict[str, Any]:
    claims = write.sighting.claims
    clock = None if write.clock_error_s is None else round(write.clock_error_s, 1)
    return {
        "device": claims.device,
        "site": claims.site,
        "last_seen": write.sighting.at,
        "last_telemetry": write.telemetry,
        "clock_skew_s": clock,
    }


_MESSAGE_COLUMNS = ("device", "seq", "event_id", "site", "kind", "test", "created", "received_at", "claims")
# A batch goes to the server as one JSON parameter, read back as rows: one statement, not one per message.
_INSERT_MESSAGES = (
    "INSERT INTO messages SELECT device, seq, event_id, site, kind, test, created, received_at, claims"
    " FROM jsonb_to_recordset(?::jsonb) AS m(n INTEGER, device TEXT, seq BIGINT, event_id TEXT, site TEXT,"
    " kind TEXT, test INTEGER, created DOUBLE PRECISION, received_at DOUBLE PRECISION, claims TEXT) ORDER BY n"
    " ON CONFLICT (device, seq) DO NOTHING RETURNING device, seq, event_id"
)
_FIND_EVENTS = (
    "SELECT m.device, m.seq, m.event_id FROM messages m"
    " JOIN jsonb_to_recordset(?::jsonb) AS k(device TEXT, seq BIGINT) ON m.device = k.device AND m.seq = k.seq"
)
_CLEAR_OUTSTANDING_MANY = (
    "DELETE FROM outstanding o USING jsonb_to_recordset(?::jsonb) AS k(device TEXT, seq BIGINT)"
    " WHERE o.device = k.device AND o.seq = k.seq RETURNING o.device, o.seq"
)
_NOTE_OUTSTANDING_MANY = (
    "INSERT INTO outstanding SELECT device, seq, noticed_at"
    " FROM jsonb_to_recordset(?::jsonb) AS k(device TEXT, seq BIGINT, noticed_at DOUBLE PRECISION)"
    " ON CONFLICT (device, seq) DO NOTHING"
)
_FLIP_BACK_MANY = (
    "UPDATE devices SET missing = 0 FROM jsonb_to_recordset(?::jsonb) AS w(device TEXT)"
    " WHERE devices.device = w.device AND devices.missing = 1 RETURNING devices.device"
)
_HEARD_MANY = (
    "INSERT INTO devices (device, site, last_seen, status, missing, last_telemetry, clock_skew_s)"
    " SELECT device, site, last_seen, 'online', 0, last_telemetry, clock_skew_s FROM jsonb_to_recordset(?::jsonb)"
    " AS w(device TEXT, site TEXT, last_seen DOUBLE PRECISION, last_telemetry TEXT, clock_skew_s DOUBLE PRECISION)"
    + HEARD_UPDATE
)


def _runs(statements: Sequence[tuple[str, Sequence[Any]]]) -> Iterator[tuple[str, list]]:
    """Consecutive statements with the same SQL, grouped: (sql, [(sql, args), …]) in order."""
    return ((sql, list(run)) for sql, run in itertools.groupby(statements, key=lambda statement: statement[0]))


def _each_result(cursor: psycopg.Cursor) -> Iterator[list[tuple]]:
    """The rows of each statement an ``executemany`` ran, in order ([] for one that returns none)."""
    while True:
        yield cursor.fetchall() if cursor.description else []
        if not cursor.nextset():
            return


class PostgresStore(ReceiverStore):
    """``ReceiverStore`` on PostgreSQL: the same methods and SQL; its own connection, transactions and types."""

    def __init__(self, dsn: str):
        self.path = None
        self.dsn = dsn
        self._lock = threading.RLock()
        self._db = PostgresConnection(dsn)
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One PostgreSQL transaction for everything inside, committed (synchronously) or rolled back.

        The exception propagates, a failed COMMIT included. Other threads wait for the whole
        transaction; nested use joins the outer one.
        """
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            self._db.begin()
            try:
                yield
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise

    def run_all(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[list[tuple]]:
        """Each statement's rows, in order, for one round trip to the server instead of one each."""
        with self._lock:
            return self._db.execute_all(statements)

    def registry(self, supervision_s: float) -> DeviceRegistry:
        return PostgresRegistry(self._db, self._lock, supervision_s, transaction=self.transaction, run_all=self.run_all)

    def store_many(self, messages: Sequence[tuple[dict[str, Any], float]]) -> list[tuple[str | None, bool]]:
        """As ``ReceiverStore.store_many``, with one INSERT for the whole batch (and one look-up, if needed)."""
        if not messages:
            return []
        rows = [
            dict(zip(_MESSAGE_COLUMNS, message_row(claims, at), strict=True), n=n)
            for n, (claims, at) in enumerate(messages)
        ]
        written = self.run_all([(_INSERT_MESSAGES, (json.dumps(rows),))])[0]
        inserted = {(device, seq): event_id for device, seq, event_id in written}
        unclaimed = set(inserted)  # each row written is one message's, the first in the batch that carries it
        stored: list[tuple[str | None, bool] | None] = []
        for claims, _ in messages:
            key = (claims["device"], claims["seq"])
            first = key in unclaimed and inserted[key] == claims["event_id"]
            if first:
                unclaimed.discard(key)
            stored.append((inserted[key], first) if key in inserted else None)
        if None in stored:  # on (device, seq) stored before this batch: what is there?
            keys = [
                {"device": c["device"], "seq": c["seq"]}
                for (c, _), s in zip(messages, stored, strict=True)
                if s is None
            ]
            found = {(d, q): e for d, q, e in self.run_all([(_FIND_EVENTS, (json.dumps(keys),))])[0]}
            stored = [
                s or (found.get((c["device"], c["seq"])), False) for (c, _), s in zip(messages, stored, strict=True)
            ]
        return stored  # type: ignore[return-value] - no None is left

    def follow_chains(self, links: Sequence[tuple[str, int, int | None, float]]) -> list[tuple[int | None, bool]]:
        """As ``ReceiverStore.follow_chains``, with one statement for each step instead of one a message."""
        if not links:
            return []
        cleared, had = self.run_all(
            [
                (_CLEAR_OUTSTANDING_MANY, (json.dumps([{"device": d, "seq": s} for d, s, _, _ in links]),)),
                (_FIND_EVENTS, (json.dumps([{"device": d, "seq": prev} for d, _, prev, _ in links if prev]),)),
            ]
        )
        filled = {(device, seq) for device, seq in cleared}
        present = {(device, seq) for device, seq, _ in had}
        missing = {(d, prev): at for d, _, prev, at in links if prev and (d, prev) not in present}
        if missing:
            noted = [{"device": d, "seq": prev, "noticed_at": at} for (d, prev), at in missing.items()]
            self.run_all([(_NOTE_OUTSTANDING_MANY, (json.dumps(noted),))])
        return [(prev if (d, prev) in missing else None, (d, seq) in filled) for d, seq, prev, _ in links]

    def _migrations(self) -> list[Callable[[], None]]:
        return [
            self._postgres_v1,
            self._postgres_v2,
            lambda: migrate_postgres(self._db),
            lambda: enrolment_tokens.migrate_postgres(self._db),
        ]

    def _postgres_v1(self) -> None:
        self._db.execute(_POSTGRES_V1)

    def _postgres_v2(self) -> None:
        self._db.execute(_POSTGRES_V2)

    def _has_table(self, name: str) -> bool:
        return self._db.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()[0]

    def _lock_schema(self) -> None:
        self._db.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK_KEY,))
