"""The centre's view of its fleet: who was last heard when, saying what, and who has gone silent.

A device is *missing* when nothing verified has come from it for longer than
its supervision interval (default 90 s; EN 50136 path-failure reporting wants
20–90 s): one "device missing" event when it goes silent, one "device back"
event when it speaks again. Enrolled devices never heard since the receiver
started count from the receiver's start.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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


@dataclass(frozen=True)
class Sighting:
    """What one committed verdict says about its device: alive (fresh, first seen), gone offline, its clock."""

    claims: MessageClaims
    at: float
    alive: bool = False
    offline: bool = False  # its last will or clean stop: a fact, never proof of life
    clock_error_s: float | None = None  # how far off its clock looked, when the message was judged by time


@dataclass
class DeviceWrite:
    """One row write for a run of sightings of one device (alive ones merged; an offline one breaks the run)."""

    first: int
    alive: bool
    offline: bool
    sighting: Sighting
    telemetry: str | None = None
    clock_error_s: float | None = None

    def statements(self) -> list[tuple[str, tuple]]:
        """The flip back from missing (first, so its answer tells), then the row itself."""
        claims, at = self.sighting.claims, self.sighting.at
        clock = None if self.clock_error_s is None else round(self.clock_error_s, 1)
        if self.alive:
            return [(_FLIP_BACK, (claims.device,)), (_HEARD, (claims.device, claims.site, at, self.telemetry, clock))]
        written = [(_OFFLINE, (claims.device, claims.site))] if self.offline else []
        return written + ([(_NOTE_CLOCK, (clock, claims.device))] if clock is not None else [])


def _coalesce(sightings: Sequence[Sighting]) -> list[DeviceWrite]:
    """Merge each device's consecutive sightings into as few row writes as keep their meaning."""
    writes: list[DeviceWrite] = []
    latest: dict[str, DeviceWrite] = {}
    for n, sighting in enumerate(sightings):
        device = sighting.claims.device
        write = latest.get(device)
        mergeable = write is not None and not write.offline and not sighting.offline
        if not mergeable or (sighting.alive and not write.alive):
            write = DeviceWrite(n, sighting.alive, sighting.offline, sighting)
            writes.append(write)
            latest[device] = write
        elif sighting.alive:
            write.sighting = sighting  # the latest arrival is the last seen
        if sighting.claims.kind == "telemetry" and sighting.alive:
            write.telemetry = json.dumps(sighting.claims.body)
        if sighting.clock_error_s is not None:
            write.clock_error_s = sighting.clock_error_s
    return writes


_FLIP_BACK = "UPDATE devices SET missing = 0 WHERE device = ? AND missing = 1 RETURNING device"
#: What hearing a device does to its row (one device's row; PostgreSQL's batch form reuses it).
HEARD_UPDATE = (
    " ON CONFLICT(device) DO UPDATE SET site = excluded.site, last_seen = excluded.last_seen,"
    " status = excluded.status, missing = 0,"
    " last_telemetry = COALESCE(excluded.last_telemetry, devices.last_telemetry),"
    " clock_skew_s = COALESCE(excluded.clock_skew_s, devices.clock_skew_s)"
)
_HEARD = (
    "INSERT INTO devices (device, site, last_seen, status, missing, last_telemetry, clock_skew_s)"
    " VALUES (?, ?, ?, 'online', 0, ?, ?)" + HEARD_UPDATE
)
_OFFLINE = "INSERT INTO devices (device, site, status) VALUES (?, ?, 'offline') ON CONFLICT(device) DO UPDATE SET status = 'offline'"
_NOTE_CLOCK = "UPDATE devices SET clock_skew_s = ? WHERE device = ?"


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
        run_all: Callable[[Sequence[tuple[str, Sequence[Any]]]], list[list[tuple]]],
    ):
        self._db = db  # sqlite3.Connection, or store_postgres's connection speaking the same SQL
        self._lock = lock
        self._transaction = transaction  # the store's: one commit (one fsync) for everything inside
        self._run_all = run_all  # the store's: many statements, one round trip on PostgreSQL
        self.supervision_s = supervision_s
        self.started_at = time.time() if started_at is None else started_at
        self._quiet: tuple[list | None, float] = (None, 0.0)  # (enrolled list, until when nobody can be overdue)

    def heard(self, claims: MessageClaims, now: float) -> DeviceEvent | None:
        """Record a fresh, first-seen message: proof of life. Returns a 'back' event if the device had been missing."""
        with self._transaction():
            return self.note([Sighting(claims, now, alive=True)]).get(0)

    def note_clock(self, device: str, skew_s: float) -> None:
        """How far off the device's clock looked on its latest verified message (arrival minus send time)."""
        with self._lock:
            self._db.execute(_NOTE_CLOCK, (round(skew_s, 1), device))

    def announced_offline(self, claims: MessageClaims, now: float) -> None:
        """The device's last will (or clean stop) says it is offline: a fact, never proof of life."""
        with self._transaction():
            self.note([Sighting(claims, now, offline=True)])

    def note(self, sightings: Sequence[Sighting]) -> dict[int, DeviceEvent]:
        """Write what committed verdicts, in arrival order, say about their devices: call inside a transaction.

        A run of sightings of one device is one row write, not one each, so the cost of a batch grows
        with the devices in it. Returns the 'back' events, keyed by the index of the sighting that
        brought the device back.
        """
        writes = _coalesce(sightings)
        backs = {}
        for write, flipped in zip(writes, self._write(writes), strict=True):
            if flipped:  # whoever flips missing 1 -> 0 reports "back", however many receivers run
                claims, at = sightings[write.first].claims, sightings[write.first].at
                backs[write.first] = self._record(
                    DeviceEvent(claims.device, claims.site, "back", f"heard again ({claims.kind})"), at
                )
        return backs

    def _write(self, writes: Sequence[DeviceWrite]) -> list[bool]:
        """Write the rows, in order; for each, whether it brought its device back from missing."""
        groups = [write.statements() for write in writes]
        rows = iter(self._run_all([statement for group in groups for statement in group]))
        answers = [[next(rows) for _ in group] for group in groups]
        return [write.alive and bool(answer[0]) for write, answer in zip(writes, answers, strict=True)]

    def check(self, enrolled: list[tuple[str, str]], now: float) -> list[DeviceEvent]:
        """Devices silent longer than the supervision interval, each reported once.

        Called every second, but the fleet is gone through only once someone may be overdue: being
        heard only ever moves a device's deadline later, so until the earliest deadline found last
        time (for the same ``enrolled`` list) nobody can be. With 50,000 devices that is a pass a
        minute, not a second.
        """
        known, quiet_until = self._quiet
        if enrolled is known and now <= quiet_until:
            return []
        with self._lock:
            rows = {r[0]: r for r in self._db.execute("SELECT device, site, last_seen, missing FROM devices")}
        silent, deadlines = [], []
        for device, site in enrolled:
            _, _, last_seen, missing = rows.get(device, (device, site, None, 0))
            since = last_seen if last_seen is not None else self.started_at
            if missing:
                continue
            if now - since <= self.supervision_s:
                deadlines.append(since + self.supervision_s)
                continue
            detail = (
                f"silent for {now - since:.0f} s (supervision {self.supervision_s:g} s)"
                if last_seen is not None
                else f"not heard since the receiver started {now - since:.0f} s ago"
            )
            silent.append(DeviceEvent(device, site, "missing", detail))
        events = self._claim_missing(silent, now) if silent else []
        # A silent device another receiver just heard keeps a deadline not in the list: look again next time.
        self._quiet = (enrolled, min(deadlines, default=math.inf) if len(events) == len(silent) else now)
        return events

    def _claim_missing(self, silent: list[DeviceEvent], now: float) -> list[DeviceEvent]:
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
            return [self._record(event, now) for event in claimed]

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
