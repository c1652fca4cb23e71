"""The centre's view of its fleet: who was last heard when, saying what, and who has gone silent.

A device is *missing* when nothing verified has come from it for longer than
its supervision interval (default 90 s; EN 50136 path-failure reporting wants
20–90 s): one "device missing" event when it goes silent, one "device back"
event when it speaks again. Enrolled devices never heard since the receiver
started count from the receiver's start.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from agent.protocol.messages import MessageClaims


@contextmanager
def atomic(db: sqlite3.Connection, lock: threading.RLock) -> Iterator[None]:
    """One transaction under ``lock`` (re-entrant): all of it committed with one fsync, or none of it."""
    with lock:
        if db.in_transaction:  # already inside one: part of it
            yield
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite already rolled back (e.g. a full disk), or the connection is gone
            raise


@dataclass(frozen=True)
class DeviceEvent:
    device: str
    site: str
    event: str  # missing / back
    detail: str


@dataclass(frozen=True)
class DeviceState:
    device: str
    site: str
    last_seen: float | None
    status: str
    missing: bool
    last_telemetry: dict[str, Any] | None
    clock_skew_s: float | None = None


class DeviceRegistry:
    """Kept in the receiver's database, so ``edge-agent receiver devices`` can read it from outside."""

    def __init__(
        self,
        db: Any,
        lock: threading.RLock,
        supervision_s: float,
        started_at: float | None = None,
        *,
        transaction: Callable[[], AbstractContextManager[None]],
    ):
        self._db = db  # sqlite3.Connection, or store_postgres's connection speaking the same SQL
        self._lock = lock
        self._transaction = transaction  # the store's: one commit (one fsync) for everything inside
        self.supervision_s = supervision_s
        self.started_at = time.time() if started_at is None else started_at

    def heard(self, claims: MessageClaims, now: float) -> DeviceEvent | None:
        """Record a fresh, first-seen message: proof of life. Returns a 'back' event if the device had been missing."""
        status = "online"
        telemetry = json.dumps(claims.body) if claims.kind == "telemetry" else None
        with self._transaction():
            # Whoever flips missing 1 -> 0 reports "back": one row lock decides, however many receivers run.
            flipped = self._db.execute(
                "UPDATE devices SET missing = 0 WHERE device = ? AND missing = 1", (claims.device,)
            ).rowcount
            self._db.execute(
                "INSERT INTO devices (device, site, last_seen, status, missing, last_telemetry) VALUES (?, ?, ?, ?, 0, ?)"
                " ON CONFLICT(device) DO UPDATE SET site = excluded.site, last_seen = excluded.last_seen,"
                " status = excluded.status, missing = 0,"
                " last_telemetry = COALESCE(excluded.last_telemetry, devices.last_telemetry)",
                (claims.device, claims.site, now, status, telemetry),
            )
            if flipped == 1:
                return self._record(
                    DeviceEvent(claims.device, claims.site, "back", f"heard again ({claims.kind})"), now
                )
        return None

    def note_clock(self, device: str, skew_s: float) -> None:
        """How far off the device's clock looked on its latest verified message (arrival minus send time)."""
        with self._lock:
            self._db.execute("UPDATE devices SET clock_skew_s = ? WHERE device = ?", (round(skew_s, 1), device))

    def announced_offline(self, claims: MessageClaims, now: float) -> None:
        """The device's last will (or clean stop) says it is offline: a fact, never proof of life."""
        with self._lock:
            self._db.execute(
                "INSERT INTO devices (device, site, status) VALUES (?, ?, 'offline')"
                " ON CONFLICT(device) DO UPDATE SET status = 'offline'",
                (claims.device, claims.site),
            )

    def check(self, enrolled: list[tuple[str, str]], now: float) -> list[DeviceEvent]:
        """Devices silent longer than the supervision interval, each reported once."""
        with self._lock:
            rows = {r[0]: r for r in self._db.execute("SELECT device, site, last_seen, missing FROM devices")}
        silent = []
        for device, site in enrolled:
            _, _, last_seen, missing = rows.get(device, (device, site, None, 0))
            since = last_seen if last_seen is not None else self.started_at
            if not missing and now - since > self.supervision_s:
                detail = (
                    f"silent for {now - since:.0f} s (supervision {self.supervision_s:g} s)"
                    if last_seen is not None
                    else f"not heard since the receiver started {now - since:.0f} s ago"
                )
                silent.append(DeviceEvent(device, site, "missing", detail))
        if not silent:
            return []
        cutoff = now - self.supervision_s
        with self._transaction():  # a whole fleet gone silent at once is one commit, not one per device
            # Whoever flips missing 0 -> 1 (and sees it still silent) reports it: once, however many receivers run.
            claimed = [
                event
                for event in silent
                if self._db.execute(
                    "INSERT INTO devices (device, site, missing) VALUES (?, ?, 1)"
                    " ON CONFLICT(device) DO UPDATE SET missing = 1"
                    " WHERE devices.missing = 0 AND (devices.last_seen IS NULL OR devices.last_seen < ?)",
                    (event.device, event.site, cutoff),
                ).rowcount
                == 1
            ]
            events = [self._record(event, now) for event in claimed]
        return events

    def _record(self, event: DeviceEvent, now: float) -> DeviceEvent:
        with self._lock:
            self._db.execute(
                "INSERT INTO device_events VALUES (?, ?, ?, ?, ?)",
                (now, event.device, event.site, event.event, event.detail),
            )
        return event

    def states(self) -> list[DeviceState]:
        with self._lock:
            rows = self._db.execute(
                "SELECT device, site, last_seen, status, missing, last_telemetry, clock_skew_s"
                " FROM devices ORDER BY site, device"
            ).fetchall()
        return [
            DeviceState(d, s, seen, status, bool(m), json.loads(t) if t else None, skew)
            for d, s, seen, status, m, t, skew in rows
        ]

    def events(self) -> list[tuple[float, str, str, str, str]]:
        with self._lock:
            return [tuple(row) for row in self._db.execute("SELECT * FROM device_events ORDER BY at").fetchall()]
