"""The centre's keyring: one JSON file per enrolled device, holding its public JWK.

Lookups hit an in-memory index, so their cost does not grow with the fleet. The
index follows the directory without a restart: enrolling (os.replace) and
revoking (deleting the file) change the directory's own mtime, which one stat
every LOOK_S, or on a key not known yet, notices (a known key costs no system call);
only then is the directory listed again, and only files
whose stat changed are parsed again. A file edited in place changes no
directory entry, so the directory is also listed every RESCAN_S regardless (rarely: with
50,000 devices a listing is 50,000 stats).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from agent.errors import KeyFileError
from agent.protocol.enrolment import EnrolledDevice, parse_record
from agent.protocol.signing import public_jwk

#: Enrolments and revocations by other processes are noticed at most this late (one stat of the directory).
LOOK_S = 0.2
#: A file rewritten in place (not replaced) is noticed at most this late.
RESCAN_S = 300.0
#: A directory's mtime ticks coarsely (ext4: the kernel's tick): after listing a directory changed this
#: recently, a second change within the same tick would leave the mtime alone, so list it again this soon.
SETTLE_S = 1.0


class Keyring:
    """Public keys of enrolled devices, looked up by key id."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._by_kid: dict[str, EnrolledDevice] = {}
        self._files: dict[str, tuple[tuple[int, int, int], EnrolledDevice | None]] = {}  # name -> (stat, device)
        self._dir_stamp: tuple[int, int] | None = None
        self._next_scan = 0.0  # time.monotonic() when the directory is listed even if its stamp is unchanged
        self._next_look = 0.0  # time.monotonic() when the directory's stamp is looked at again
        #: How many times the directory has been listed: a lookup costs one stat, not a listing.
        self.reloads = 0

    def __len__(self) -> int:
        self._refresh()
        return len(self._by_kid)

    def enroll(self, record: dict[str, Any], where: str = "enrolment record") -> EnrolledDevice:
        """Validate an enrolment record and store it; re-enrolling a device replaces its key."""
        device = parse_record(record, where)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{device.device_id}.json"
        kept: dict[str, Any] = {
            "device_id": device.device_id,
            "site": device.site,
            "kind": device.kind,
            "jwk": public_jwk(device.key),
        }
        if device.position is not None:
            kept["position"] = device.position.as_record()
        if device.location:
            kept["location"] = device.location
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(kept, indent=2) + "\n")
        os.replace(tmp, path)  # changes the directory's mtime: every Keyring on it re-lists it
        self._next_look = 0.0  # this one at once
        return device

    def lookup(self, kid: str) -> EnrolledDevice | None:
        """The device enrolled under ``kid``; a key not known yet makes the directory be looked at now.

        So a device enrolled a moment ago is never refused, and a known key costs no system call.
        """
        self._refresh()
        device = self._by_kid.get(kid)
        if device is None:
            self.look_now()
            device = self._by_kid.get(kid)
        return device

    def devices(self) -> list[EnrolledDevice]:
        self._refresh()
        return sorted(self._by_kid.values(), key=lambda d: (d.site, d.device_id))

    def look_now(self) -> None:
        """Look at the directory now, not within LOOK_S: before a decision another process's enrolment could change."""
        self._next_look = 0.0
        self._refresh()

    def generation(self) -> int:
        """A number that changes whenever the enrolled set may have (the directory was listed again)."""
        self._refresh()
        return self.reloads

    def _refresh(self) -> None:
        """One stat of the directory every LOOK_S; a listing only when it changed (or RESCAN_S/SETTLE_S have passed)."""
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + LOOK_S
        stamp = self._directory_stamp()
        if stamp == self._dir_stamp and time.monotonic() < self._next_scan:
            return
        with self._lock:
            if stamp == self._dir_stamp and time.monotonic() < self._next_scan:
                return  # another thread listed it meanwhile
            self._scan()
            self._dir_stamp = stamp
            age_s = time.time() - stamp[1] / 1e9 if stamp else RESCAN_S
            self._next_scan = time.monotonic() + (SETTLE_S if age_s < SETTLE_S + 1 else RESCAN_S)

    def _directory_stamp(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.directory)
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns

    def _scan(self) -> None:
        """List the directory and parse the files that are new or changed; invalid files are skipped."""
        self.reloads += 1
        try:
            with os.scandir(self.directory) as entries:
                found = sorted((e.name, e.path) for e in entries if e.name.endswith(".json"))
        except OSError:
            found = []
        files: dict[str, tuple[tuple[int, int, int], EnrolledDevice | None]] = {}
        for name, path in found:
            try:
                info = os.stat(path)
            except OSError:
                continue  # deleted since the listing: revoked
            stat = (info.st_ino, info.st_mtime_ns, info.st_size)
            known = self._files.get(name)
            files[name] = known if known is not None and known[0] == stat else (stat, _read(path))
        self._files = files
        self._by_kid = {device.kid: device for _, device in files.values() if device is not None}


def _read(path: str) -> EnrolledDevice | None:
    try:
        with open(path, encoding="utf-8") as file:
            return parse_record(json.load(file), path)
    except (OSError, ValueError, KeyFileError):
        return None
