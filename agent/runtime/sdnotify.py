"""systemd's notify protocol in a few lines of stdlib: READY=1, WATCHDOG=1, STATUS=….

A datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace); a no-op when the variable is unset, as when run by hand.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, address: str | None = None):
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *states: str) -> bool:
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(states).encode(), target)
        except OSError as exc:
            if not self._failed:  # once, not on every ping
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._failed = True
            return False
        self._failed = False
        return True


def watchdog_interval_s() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


class HealthWatchdog:
    """Sends WATCHDOG=1 only while ``problems()`` finds none, so systemd restarts a stuck service.

    A change of health is logged once and shown in ``systemctl status`` (STATUS=…), not on every tick.
    """

    def __init__(self, problems: Callable[[], list[str]], notifier: SystemdNotifier, healthy_status: str):
        self.problems = problems
        self.notifier = notifier
        self.healthy_status = healthy_status
        self.interval_s = watchdog_interval_s() or 5.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        reported: list[str] = []
        while not self._stop.wait(self.interval_s):
            found = self.problems()
            if not found:
                self.notifier.notify("WATCHDOG=1")
            if found != reported:
                if found:
                    log.error("unhealthy, withholding the watchdog: %s", "; ".join(found))
                    self.notifier.notify(f"STATUS=unhealthy: {'; '.join(found)}")
                else:
                    log.info("healthy again")
                    self.notifier.notify(f"STATUS={self.healthy_status}")
                reported = found
