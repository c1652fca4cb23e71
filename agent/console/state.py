"""What the console keeps in the receiver's store: who handles which alert, the audit log, operators.

The tables come with the store's schema version 2 (``agent.centre.store``); this module only reads and
writes them, through the store's own transaction and ``run_all``, so it works on SQLite and PostgreSQL
alike and every console on one store sees the same state. Each action and its audit entry are one commit.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from agent.centre.store import ReceiverStore

#: Message kinds an operator handles (camera "event" phases and telemetry are not in the queue).
QUEUE_KINDS = ("alert", "tamper")
ROLES = ("operator", "supervisor", "installer")
OUTCOMES = ("help-sent", "resolved-on-call", "false-alarm", "test", "no-action")
#: The open part of the queue is at most this long (oldest dropped from view, never from the store).
QUEUE_LIMIT = 500

_ALERT_COLUMNS = (
    "SELECT m.device, m.seq, m.site, m.kind, m.test, m.created, m.received_at, m.claims,"
    " h.state, h.taken_by, h.taken_at, h.closed_by, h.closed_at, h.outcome, h.note"
    " FROM messages m LEFT JOIN alert_handling h ON h.device = m.device AND h.seq = m.seq"
)
_OPEN = (
    _ALERT_COLUMNS + " WHERE m.kind IN ('alert', 'tamper') AND (h.state IS NULL OR h.state <> 'closed')"
    " ORDER BY m.received_at DESC LIMIT ?"
)
_CLOSED = _ALERT_COLUMNS + " WHERE h.state = 'closed' ORDER BY h.closed_at DESC LIMIT ?"
_ONE = _ALERT_COLUMNS + " WHERE m.device = ? AND m.seq = ? AND m.kind IN ('alert', 'tamper')"
_TAKE = (
    "INSERT INTO alert_handling (device, seq, state, taken_by, taken_at) VALUES (?, ?, 'taken', ?, ?)"
    " ON CONFLICT (device, seq) DO UPDATE SET state = 'taken', taken_by = excluded.taken_by,"
    " taken_at = excluded.taken_at WHERE alert_handling.state = 'open' RETURNING device"
)
_CLOSE = (
    "INSERT INTO alert_handling (device, seq, state, closed_by, closed_at, outcome, note)"
    " VALUES (?, ?, 'closed', ?, ?, ?, ?)"
    " ON CONFLICT (device, seq) DO UPDATE SET state = 'closed', closed_by = excluded.closed_by,"
    " closed_at = excluded.closed_at, outcome = excluded.outcome, note = excluded.note"
    " WHERE alert_handling.state <> 'closed' RETURNING device"
)
_REASSIGN = (
    "UPDATE alert_handling SET taken_by = ?, taken_at = ?"
    " WHERE device = ? AND seq = ? AND state = 'taken' AND taken_by = ? RETURNING device"
)
#: The roles that may hold an alert (take charge of it, or be given it).
HANDLING_ROLES = ("operator", "supervisor")
_AUDIT = "INSERT INTO audit_log (at, actor, action, device, seq, detail) VALUES (?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True)
class AlertView:
    """One alert as an operator sees it: the stored message and how it is being handled."""

    device: str
    seq: int
    site: str
    kind: str
    test: bool
    created: float
    received_at: float
    claims: dict[str, Any]
    state: str = "open"
    taken_by: str | None = None
    taken_at: float | None = None
    closed_by: str | None = None
    closed_at: float | None = None
    outcome: str | None = None
    note: str | None = None

    @property
    def key(self) -> str:
        return f"{self.device}/{self.seq}"

    @property
    def body(self) -> dict[str, Any]:
        body = self.claims.get("body")
        return body if isinstance(body, dict) else {}

    @property
    def is_camera(self) -> bool:
        return self.body.get("source") == "camera"

    @property
    def silent(self) -> bool:
        """Silent or duress: prominent here, and nothing goes back to the device that would show it."""
        return self.body.get("silent") is True or self.body.get("alert_kind") == "duress"

    @property
    def what(self) -> str:
        """The alert's kind in an operator's words: the button's alert kind, the camera rule, or tamper."""
        if self.kind == "tamper":
            return f"tamper ({self.body.get('enclosure', '?')})"
        if self.is_camera:
            return f"camera: {self.body.get('rule_type') or self.body.get('rule') or '?'}"
        return str(self.body.get("alert_kind") or "alert")

    @property
    def location(self) -> str:
        return str(self.body.get("location") or self.body.get("camera") or "")

    @property
    def counts(self) -> dict[str, int]:
        """Objects per class for a camera alert (from the objects it lists), else empty."""
        objects = self.body.get("objects")
        if not isinstance(objects, list):
            return {}
        return dict(Counter(str(o.get("label")) for o in objects if isinstance(o, dict)))

    @property
    def classes(self) -> list[str]:
        classes = self.body.get("classes")
        return [str(c) for c in classes] if isinstance(classes, list) else sorted(self.counts)


@dataclass(frozen=True)
class AuditEntry:
    at: float
    actor: str
    action: str
    device: str | None
    seq: int | None
    detail: str


class ConsoleState:
    """The console's reads and writes on the receiver's store."""

    def __init__(self, store: ReceiverStore):
        self.store = store

    def queue(self, closed_shown: int = 20) -> tuple[list[AlertView], list[AlertView]]:
        """(open and taken alerts, newest first; the latest closed ones)."""
        open_rows, closed_rows = self.store.run_all([(_OPEN, (QUEUE_LIMIT,)), (_CLOSED, (closed_shown,))])
        return [_view(row) for row in open_rows], [_view(row) for row in closed_rows]

    def queue_signature(self) -> tuple:
        """Changes whenever the queue's content does (a new alert, a take or close, a sequence gap), cheaply.

        Telemetry and other fleet changes leave it alone, so open queues are not fetched again for them.
        """
        rows = self.store.run_all(
            [
                ("SELECT count(*), max(received_at) FROM messages WHERE kind IN ('alert', 'tamper')", ()),
                ("SELECT count(*), max(taken_at), max(closed_at) FROM alert_handling", ()),
                ("SELECT count(*) FROM outstanding", ()),
            ]
        )
        return tuple(tuple(r[0]) for r in rows)

    def alert(self, device: str, seq: int) -> AlertView | None:
        (rows,) = self.store.run_all([(_ONE, (device, seq))])
        return _view(rows[0]) if rows else None

    def take(self, alert: AlertView, operator: str, now: float) -> bool:
        """Take charge of an open alert, audited in the same commit; False if someone else already has it."""
        with self.store.transaction():
            (taken,) = self.store.run_all([(_TAKE, (alert.device, alert.seq, operator, now))])
            if taken:
                self._audit(now, operator, "take-charge", alert.device, alert.seq, alert.what)
        return bool(taken)

    def reassign(self, alert: AlertView, supervisor: str, holder: str, to: str, now: float) -> bool:
        """Give a taken alert to another account that handles alerts, audited in the same commit.

        False if ``holder`` (whom the supervisor saw holding it) no longer does, or ``to`` may not hold it.
        """
        if to == holder or to not in self.handlers():
            return False
        with self.store.transaction():
            (moved,) = self.store.run_all([(_REASSIGN, (to, now, alert.device, alert.seq, holder))])
            if moved:
                self._audit(now, supervisor, "reassign", alert.device, alert.seq, f"from {holder} to {to}")
        return bool(moved)

    def handlers(self) -> list[str]:
        """The accounts that may hold an alert, by name."""
        roles = ", ".join("?" for _ in HANDLING_ROLES)
        sql = f"SELECT name FROM operators WHERE role IN ({roles}) ORDER BY name"
        (rows,) = self.store.run_all([(sql, HANDLING_ROLES)])
        return [name for (name,) in rows]

    def close(self, alert: AlertView, operator: str, outcome: str, note: str, now: float) -> bool:
        """Close an alert with an outcome and a note, audited in the same commit; False if already closed."""
        with self.store.transaction():
            (closed,) = self.store.run_all([(_CLOSE, (alert.device, alert.seq, operator, now, outcome, note))])
            if closed:
                self._audit(now, operator, "close", alert.device, alert.seq, f"{outcome}: {note}")
        return bool(closed)

    def audit(self, at: float, actor: str, action: str, detail: str = "", alert: AlertView | None = None) -> None:
        """Append to the audit log (never a password: callers pass what happened, not what was typed)."""
        with self.store.transaction():
            self._audit(at, actor, action, alert.device if alert else None, alert.seq if alert else None, detail)

    def _audit(self, at: float, actor: str, action: str, device: str | None, seq: int | None, detail: str) -> None:
        self.store.run_all([(_AUDIT, (at, actor, action, device, seq, detail[:500]))])

    def audit_log(self, limit: int = 200) -> list[AuditEntry]:
        sql = "SELECT at, actor, action, device, seq, detail FROM audit_log ORDER BY id DESC LIMIT ?"
        (rows,) = self.store.run_all([(sql, (limit,))])
        return [AuditEntry(*row) for row in rows]

    def add_operator(self, name: str, password_hash: str, role: str, now: float, *, replace: bool = False) -> bool:
        """Create an account (or, with ``replace``, set its password and role); False if it exists."""
        if role not in ROLES:
            raise ValueError(f"role {role!r}: choose one of {', '.join(ROLES)}")
        conflict = (
            "DO UPDATE SET password_hash = excluded.password_hash, role = excluded.role" if replace else "DO NOTHING"
        )
        sql = f"INSERT INTO operators VALUES (?, ?, ?, ?) ON CONFLICT (name) {conflict} RETURNING name"
        with self.store.transaction():
            (rows,) = self.store.run_all([(sql, (name, password_hash, role, now))])
            if rows:
                self._audit(
                    now, "command-line", "account-set" if replace else "account-add", None, None, f"{name} ({role})"
                )
        return bool(rows)

    def operator(self, name: str) -> tuple[str, str] | None:
        """(password hash, role) of an account, or None."""
        (rows,) = self.store.run_all([("SELECT password_hash, role FROM operators WHERE name = ?", (name,))])
        return (rows[0][0], rows[0][1]) if rows else None

    def set_password_hash(self, name: str, password_hash: str) -> None:
        """A rehash after login when argon2's parameters have grown (no audit: nothing changed for anyone)."""
        self.store.run_all([("UPDATE operators SET password_hash = ? WHERE name = ?", (password_hash, name))])

    def last_test_alerts(self) -> dict[str, float]:
        """When each device last sent a test alert (its own time)."""
        sql = "SELECT device, max(created) FROM messages WHERE test = 1 AND kind = 'alert' GROUP BY device"
        (rows,) = self.store.run_all([(sql, ())])
        return {device: at for device, at in rows}


def _view(row: tuple) -> AlertView:
    device, seq, site, kind, test, created, received_at, claims, *handling = row
    state, *rest = handling
    return AlertView(
        device, seq, site, kind, bool(test), created, received_at, json.loads(claims), state or "open", *rest
    )
