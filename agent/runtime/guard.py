"""Long-lived threads that outlive their own bugs, and that the watchdog can see.

A thread on the alert path must not die because one message, one row or one
system call surprised it: the surprise is logged once per kind (with its
traceback), counted, shown in ``status`` and telemetry, and the loop goes on.
A thread that is dead or has not beaten for ``stall_s`` is a *problem*, and
the systemd watchdog is withheld while there is one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

#: A loop that has not beaten for this long is stuck (its own ticks are much shorter).
STALL_S = 5.0


class LoopGuard:
    """The health of one long-lived loop: heartbeat, unexpected errors, liveness of its thread."""

    def __init__(self, name: str, stall_s: float = STALL_S):
        self.name = name
        self.stall_s = stall_s
        self.errors: Counter[str] = Counter()
        self.last_beat = time.monotonic()
        self._thread: threading.Thread | None = None
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<LoopGuard {self.name} alive={self.is_alive} errors={sum(self.errors.values())}>"

    def start(self, target: Callable[[], None]) -> threading.Thread:
        """Run ``target`` on a daemon thread named after this loop."""
        self.beat()
        self._thread = threading.Thread(target=target, name=self.name, daemon=True)
        self._thread.start()
        return self._thread

    def join(self, timeout: float) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Run one unit of work; an exception ends the unit, never the loop."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - this is the one place that must catch everything
            self.failed(what, exc)

    def failed(self, what: str, exc: BaseException) -> None:
        kind = f"{what}: {type(exc).__name__}"
        with self._lock:
            self.errors[kind] += 1
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            log.error("%s: unexpected error in %s (logged once, counted after): %s", self.name, what, exc, exc_info=exc)
        else:
            log.debug("%s: %s again: %s", self.name, kind, exc)

    def problem(self) -> str | None:
        """Why the watchdog should not be fed, or None."""
        if self._thread is None:
            return None  # not started (yet): nothing to supervise
        if not self._thread.is_alive():
            return f"{self.name} thread stopped"
        silent = time.monotonic() - self.last_beat
        if silent > self.stall_s:
            return f"{self.name} thread stuck for {silent:.0f} s"
        return None

    def report(self) -> dict[str, object]:
        """For status and telemetry."""
        with self._lock:
            errors = dict(self.errors)
        return {"alive": self.is_alive, "errors": errors}
