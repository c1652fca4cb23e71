"""One agent per state directory: an exclusive lock held for the agent's lifetime.

Two agents on one state directory would share one outbox, one sequence counter
and one control socket: the second would unlink the first's socket, and both
would publish the same rows. ``flock`` on ``agent.lock`` makes the second one
stop at start with a message naming the first; the kernel drops the lock when
its holder dies, even by ``kill -9``, so a stale lock file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from agent.errors import AgentError

LOCK_NAME = "agent.lock"
_PID_WIDTH = 16  # the PID is written in place, padded: a restart on a full disk needs no new block


class StateDirInUse(AgentError, RuntimeError):
    """Another process holds the state directory's lock."""


class StateDirLock:
    """Holds ``<state_dir>/agent.lock`` (flock, exclusive) and writes this process's PID in it."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Not "a+b": with O_APPEND, Linux's pwrite ignores the offset. Held open for the agent's lifetime.
        self._file = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), "r+b")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self._file.close()
            raise StateDirInUse(
                f"state directory {self.path.parent} is in use by another edge-agent ({holder}); "
                "stop that one, or give this one its own [device] state_dir"
            ) from None
        self._write_pid()

    def __repr__(self) -> str:
        return f"<StateDirLock {self.path} held={not self._file.closed}>"

    def _holder(self) -> str:
        self._file.seek(0)
        text = self._file.read(_PID_WIDTH).decode("ascii", "replace").strip()
        return f"PID {text}" if text.isdigit() else "PID unknown"

    def _write_pid(self) -> None:
        try:
            os.pwrite(self._file.fileno(), str(os.getpid()).ljust(_PID_WIDTH - 1).encode() + b"\n", 0)
            os.ftruncate(self._file.fileno(), _PID_WIDTH)
        except OSError:
            pass  # a full disk on first start: the lock holds all the same, only the PID goes unnamed

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the last descriptor drops the flock
