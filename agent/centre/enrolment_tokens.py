"""One-time enrolment tokens and the enrolment requests they bring, in the receiver's database.

Only a token's SHA-256 is stored. A fast hash is right here, unlike for passwords: a token is
128 random bits, so there is nothing to guess from a dictionary and a brute force of 2^128
SHA-256 evaluations is out of reach however fast each one is; a slow hash (bcrypt, scrypt)
would only make every lookup by hash impossible (salted) or slow, and would add nothing.

A token goes ``unused`` → ``used`` (enrolled at once, ``--approve auto``) or ``unused`` →
``pending`` → ``used``/``rejected`` (``--approve operator``). It stays bound to the device key
that first presented it: the same key asking again gets the same answer (an answer lost on the
way is not a lost device); any other key is refused (``used``).

The schema is migration step 4 (``migrate_sqlite`` / ``migrate_postgres``), after the forwarding outbox.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from agent.protocol.zero_touch import TOKEN_PREFIX

_TABLES = """
CREATE TABLE IF NOT EXISTS enrolment_tokens (
    token_hash TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    approve TEXT NOT NULL,
    created_at {real} NOT NULL,
    expires_at {real} NOT NULL,
    state TEXT NOT NULL DEFAULT 'unused',
    device TEXT,
    kid TEXT,
    used_at {real}
);
CREATE TABLE IF NOT EXISTS enrolment_requests (
    id {serial},
    token_hash TEXT NOT NULL UNIQUE,
    client_id TEXT NOT NULL,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    kind TEXT NOT NULL,
    kid TEXT NOT NULL,
    record TEXT NOT NULL,
    csr TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    cert TEXT,
    requested_at {real} NOT NULL,
    decided_at {real}
)
"""
SQLITE_ENROLMENT = _TABLES.format(real="REAL", serial="INTEGER PRIMARY KEY AUTOINCREMENT")
POSTGRES_ENROLMENT = _TABLES.format(real="DOUBLE PRECISION", serial="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")

Approval = Literal["auto", "operator"]


def migrate_sqlite(db: Any) -> None:
    """Migration step 4: enrolment tokens and requests (SQLite)."""
    for statement in SQLITE_ENROLMENT.split(";"):
        db.execute(statement)


def migrate_postgres(db: Any) -> None:
    """Migration step 4: enrolment tokens and requests (PostgreSQL)."""
    for statement in POSTGRES_ENROLMENT.split(";"):
        db.execute(statement)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """128 random bits, base64url: ``et1_`` + 22 characters."""
    return TOKEN_PREFIX + secrets.token_urlsafe(16)


@dataclass(frozen=True)
class TokenRow:
    token_hash: str
    site: str
    kind: str
    approve: str
    created_at: float
    expires_at: float
    state: str
    device: str | None
    kid: str | None
    used_at: float | None


@dataclass(frozen=True)
class RequestRow:
    id: int
    token_hash: str
    client_id: str
    site: str
    device: str
    kind: str
    kid: str
    record: dict[str, Any]
    csr: str | None
    state: str
    reason: str | None
    cert: str | None
    requested_at: float
    decided_at: float | None


_REQUEST_COLUMNS = (
    "id, token_hash, client_id, site, device, kind, kid, record, csr, state, reason, cert, requested_at, decided_at"
)


class TokenBook:
    """Tokens and requests in a ``ReceiverStore`` (SQLite or PostgreSQL): the same SQL on both."""

    def __init__(self, store):
        self.store = store

    def create(self, site: str, kind: str, count: int, expires_at: float, approve: Approval, now: float) -> list[str]:
        """``count`` new tokens; only their hashes are kept, so the caller must hand them out now."""
        tokens = [new_token() for _ in range(count)]
        insert = "INSERT INTO enrolment_tokens (token_hash, site, kind, approve, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)"
        with self.store.transaction():
            self.store.run_all([(insert, (token_hash(t), site, kind, approve, now, expires_at)) for t in tokens])
        return tokens

    def token(self, hashed: str) -> TokenRow | None:
        rows = self.store.run_all([("SELECT * FROM enrolment_tokens WHERE token_hash = ?", (hashed,))])[0]
        return TokenRow(*rows[0]) if rows else None

    def bind(self, hashed: str, state: str, device: str, kid: str, now: float) -> None:
        sql = "UPDATE enrolment_tokens SET state = ?, device = ?, kid = ?, used_at = ? WHERE token_hash = ?"
        self.store.run_all([(sql, (state, device, kid, now, hashed))])

    def add_request(self, hashed: str, client_id: str, record: dict[str, Any], csr: str | None, state: str, now: float):
        sql = (
            "INSERT INTO enrolment_requests (token_hash, client_id, site, device, kind, kid, record, csr, state,"
            " requested_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        fields = (record["site"], record["device_id"], str(record.get("kind", "")), record["kid"])
        self.store.run_all([(sql, (hashed, client_id, *fields, json.dumps(record), csr, state, now))])

    def decide(self, request_id: int, state: str, now: float, *, cert: str | None = None, reason: str | None = None):
        sql = "UPDATE enrolment_requests SET state = ?, cert = ?, reason = ?, decided_at = ? WHERE id = ?"
        self.store.run_all([(sql, (state, cert, reason, now, request_id))])

    def request_for(self, hashed: str) -> RequestRow | None:
        rows = self.store.run_all(
            [(f"SELECT {_REQUEST_COLUMNS} FROM enrolment_requests WHERE token_hash = ?", (hashed,))]
        )
        return _request(rows[0][0]) if rows[0] else None

    def request(self, request_id: int) -> RequestRow | None:
        rows = self.store.run_all([(f"SELECT {_REQUEST_COLUMNS} FROM enrolment_requests WHERE id = ?", (request_id,))])
        return _request(rows[0][0]) if rows[0] else None

    def requests(self, state: str | None = None) -> list[RequestRow]:
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        rows = self.store.run_all([(f"SELECT {_REQUEST_COLUMNS} FROM enrolment_requests {where} ORDER BY id", args)])
        return [_request(row) for row in rows[0]]


def _request(row: tuple) -> RequestRow:
    values = list(row)
    values[7] = json.loads(values[7])
    return RequestRow(*values)
