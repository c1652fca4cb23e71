"""What the outbox keeps in reserve for a full disk: disk space, and sequence numbers that need none.

Telemetry, logs, evidence images or a runaway process can fill the SD card. An
alert must still reach disk before the press is accepted, so the outbox sets
space aside *in advance*:

- :class:`SpaceReserve` is a ballast file next to the database, allocated with
  real blocks (``posix_fallocate``: a sparse file would reserve nothing). When
  SQLite reports the disk full on an alert-path write, the outbox gives back
  one step of the ballast and retries the write; the rest stays held, so
  whatever else is filling the disk cannot take it all at once. The ballast is
  grown back once the filesystem has room again.

  Why a file and not free pages kept inside the database: in WAL mode every
  commit appends frames to the ``-wal`` file, and a checkpoint copies them into
  the main file, so free pages inside the database only help after a
  checkpoint, and the WAL itself still grows. A ballast frees bytes for
  whichever of the two files needs them, with no knowledge of SQLite's layout.

- :class:`SequenceFloor` records, in a tiny pre-allocated file rewritten in
  place (so it needs no new blocks on a full disk), the highest sequence number
  handed out for a message that is not (yet) in the database: a press held in
  memory and published directly, a status message. The database's counter
  alone would forget it on ``kill -9``, and the next press would reuse the
  number: the centre would reject that alert as a replay.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

#: How much of the ballast one "disk full" gives back (a 300-byte alert costs ~5 KB of WAL).
RELEASE_STEP = 256 * 1024
#: Space left to the rest of the system when the ballast is grown back.
KEEP_FREE = 256 * 1024
#: How often a ballast that is not at its full size looks for room to grow back.
REGROW_EVERY_S = 2.0


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding ``directory``."""
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


class SpaceReserve:
    """A ballast file of ``size`` bytes of real blocks, given back step by step when the disk is full.

    Args:
        path: the ballast file (next to the outbox database, on the same filesystem).
        size: bytes to hold; 0 disables the reserve (and removes a ballast left from before).
        step: bytes given back per :meth:`release_step`.
    """

    def __init__(self, path: Path, size: int, step: int = RELEASE_STEP):
        self.path = Path(path)
        self.size = size
        self.step = max(4096, step)
        self.releases = 0
        self._next_regrow = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SpaceReserve {self.path} held={self.held}/{self.size}>"

    @property
    def held(self) -> int:
        """Bytes the ballast really occupies (allocated blocks, not its apparent length)."""
        try:
            stats = os.stat(self.path)
        except FileNotFoundError:
            return 0
        return min(stats.st_size, stats.st_blocks * 512)

    @property
    def in_use(self) -> bool:
        """True when part of the reserve has been given back (or never could be set aside): the disk is full."""
        return self.size > 0 and self.held < self.size

    def report(self) -> dict[str, int | bool]:
        return {"target_bytes": self.size, "held_bytes": self.held, "in_use": self.in_use, "releases": self.releases}

    def release_step(self) -> int:
        """Give back one step of the ballast; returns the bytes freed (0: the reserve is exhausted)."""
        with self._lock:
            held = self.held if self.size else 0  # size 0: not ours to give (a second opener, or switched off)
            if held == 0:
                return 0
            keep = max(0, held - self.step)
            with _opened(self.path) as fd:
                os.ftruncate(fd, keep)
                os.fsync(fd)  # commits the freed blocks: some filesystems reuse them only after that
            self.releases += 1
            self._next_regrow = time.monotonic() + REGROW_EVERY_S
        log.warning(
            "disk full: gave %d KiB of the outbox reserve back (%d KiB left)", (held - keep) // 1024, keep // 1024
        )
        return held - keep

    def regrow_due(self) -> bool:
        return self.in_use and time.monotonic() >= self._next_regrow

    def top_up(self) -> int:
        """Grow the ballast back towards ``size`` where the filesystem has room; returns the bytes added.

        Grows only while ``KEEP_FREE`` bytes stay free for everything else, and never by less
        than a step (or what is missing), so it does not dribble into the last free blocks.
        """
        with self._lock:
            self._next_regrow = time.monotonic() + REGROW_EVERY_S
            if self.size == 0:
                self.path.unlink(missing_ok=True)  # reserve switched off: do not keep an old ballast
                return 0
            held = self.held
            if held >= self.size:
                if os.stat(self.path).st_size > self.size:  # the reserve was made smaller
                    os.truncate(self.path, self.size)
                return 0
            missing = self.size - held
            room = free_bytes(self.path.parent) - KEEP_FREE
            grow = min(missing, room)
            if grow < min(self.step, missing):
                return 0
            target = held + grow - grow % 4096 if grow < missing else self.size
            try:
                with _opened(self.path) as fd:
                    try:
                        os.posix_fallocate(fd, 0, target)
                    except OSError:
                        os.ftruncate(fd, held)  # a failed fallocate may leave a partial extension
                        raise
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                return 0
            return self.held - held


class SequenceFloor:
    """The highest sequence number handed out without a database row, kept durable on a full disk.

    Two 512-byte slots, each ``<seq> <crc32>``, in a file allocated once; a write goes to
    the slot holding the lower value and is fsynced, so a torn write leaves the other slot
    (the previous floor) readable, and the write needs no new blocks.
    """

    SLOT = 512

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        with contextlib.suppress(OSError):
            self._allocate()

    def _allocate(self) -> None:
        with _opened(self.path) as fd:
            if os.fstat(fd).st_blocks * 512 < 2 * self.SLOT:
                os.posix_fallocate(fd, 0, 2 * self.SLOT)

    def _slots(self, fd: int) -> list[int]:
        values = []
        for index in range(2):
            raw = os.pread(fd, self.SLOT, index * self.SLOT).split(b"\n", 1)[0]
            try:
                text, crc = raw.decode("ascii").split(" ")
                value = int(text)
            except ValueError:
                values.append(-1)
                continue
            values.append(value if f"{zlib.crc32(text.encode()):08x}" == crc else -1)
        return values

    def read(self) -> int:
        """The floor (0 when nothing was ever handed out this way)."""
        try:
            with _opened(self.path, create=False) as fd:
                return max(0, *self._slots(fd))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise OSError(exc.errno, f"cannot read the sequence floor {self.path}: {exc.strerror}") from exc

    def raise_to(self, seq: int) -> None:
        """Record ``seq`` durably before it is used; raises OSError if it cannot be."""
        with self._lock:
            self._allocate()
            with _opened(self.path) as fd:
                slots = self._slots(fd)
                if max(slots) >= seq:
                    return
                text = str(seq)
                line = f"{text} {zlib.crc32(text.encode()):08x}\n".encode()
                os.pwrite(fd, line.ljust(self.SLOT, b" "), slots.index(min(slots)) * self.SLOT)
                os.fsync(fd)


@contextlib.contextmanager
def _opened(path: Path, create: bool = True):
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0) | os.O_CLOEXEC, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)
