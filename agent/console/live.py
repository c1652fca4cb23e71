"""Commits to the store, turned into a "something changed" signal for every open console page.

Whoever commits (a receiver storing an alert, this console or another taking charge), the watcher sees
it from the database itself: on PostgreSQL by ``LISTEN edge_console`` (the schema's triggers NOTIFY on
every commit that changes messages, devices or alert handling), on SQLite by polling ``PRAGMA
data_version``, which changes whenever another connection commits: a cheap read, every 0.2 s.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: How often SQLite's change counter is read; a new alert is on the page within about this plus a fetch.
POLL_S = 0.2
CHANNEL = "edge_console"


class SqliteWatcher:
    """Calls ``changed`` after any other connection committed to the SQLite file."""

    def __init__(self, path: Path, interval_s: float = POLL_S):
        self.path = Path(path)
        self.interval_s = interval_s

    def run(self, changed: Callable[[], None], stop: threading.Event) -> None:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        try:
            seen = db.execute("PRAGMA data_version").fetchone()[0]
            while not stop.wait(self.interval_s):
                now = db.execute("PRAGMA data_version").fetchone()[0]
                if now != seen:
                    seen = now
                    changed()
        finally:
            db.close()


class PostgresWatcher:
    """Calls ``changed`` on every NOTIFY the schema's triggers send; listens again after a lost connection."""

    def __init__(self, dsn: str):
        self.dsn = dsn

    def run(self, changed: Callable[[], None], stop: threading.Event) -> None:
        import psycopg  # only where PostgreSQL is used

        while not stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    changed()  # whatever happened while not listening
                    while not stop.is_set():
                        if any(True for _ in conn.notifies(timeout=0.5)):
                            changed()
            except psycopg.Error as exc:
                log.warning("console: lost the database's change notifications (%s); listening again", exc)
                stop.wait(1.0)


class ChangeFeed:
    """A version number that grows with each seen change; pages wait on it without a thread each."""

    def __init__(self, watcher: SqliteWatcher | PostgresWatcher):
        self.watcher = watcher
        self.version = 0
        self.closing = False  # set on shutdown: every waiting event stream ends
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch in a thread; bump the version on ``loop`` (the web server's) for the waiting pages."""
        self._loop = loop
        self._event = asyncio.Event()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="console-changes", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.watcher.run(self._changed, self._stop)
            except Exception:  # noqa: BLE001 - a watcher failing must not end live updates for good
                log.exception("console: the change watcher failed; starting it again")
                self._stop.wait(1.0)

    def _changed(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._bump)

    def _bump(self) -> None:
        self.version += 1
        event, self._event = self._event, asyncio.Event()
        if event is not None:
            event.set()

    async def next_change(self, seen: int, timeout_s: float) -> int:
        """The version after ``seen``, or the same one after ``timeout_s`` without a change."""
        if self.version != seen or self._event is None:
            return self.version
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except TimeoutError:
            pass
        return self.version

    def end_streams(self) -> None:
        """Wake every waiting page stream so it sees ``closing`` and ends (the server can then stop at once)."""
        self.closing = True
        self._changed()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
