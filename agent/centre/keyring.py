"""The centre's keyring: one JSON file per enrolled device, holding its public JWK.

The directory is re-read when it changes, so enrolling needs no restart.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from agent.errors import KeyFileError
from agent.protocol.enrolment import EnrolledDevice, parse_record
from agent.protocol.signing import public_jwk


class Keyring:
    """Public keys of enrolled devices, looked up by key id."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._by_kid: dict[str, EnrolledDevice] = {}
        self._stamp: tuple | None = None

    def __len__(self) -> int:
        self._reload_if_changed()
        return len(self._by_kid)

    def enroll(self, record: dict[str, Any], where: str = "enrolment record") -> EnrolledDevice:
        """Validate an enrolment record and store it; re-enrolling a device replaces its key."""
        device = parse_record(record, where)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{device.device_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "device_id": device.device_id,
                    "site": device.site,
                    "kind": device.kind,
                    "jwk": public_jwk(device.key),
                },
                indent=2,
            )
            + "\n"
        )
        os.replace(tmp, path)
        return device

    def lookup(self, kid: str) -> EnrolledDevice | None:
        self._reload_if_changed()
        return self._by_kid.get(kid)

    def devices(self) -> list[EnrolledDevice]:
        self._reload_if_changed()
        return sorted(self._by_kid.values(), key=lambda d: (d.site, d.device_id))

    def _reload_if_changed(self) -> None:
        try:
            files = sorted(self.directory.glob("*.json"))
            stamp = tuple((f.name, f.stat().st_mtime_ns) for f in files)
        except OSError:
            files, stamp = [], ()
        with self._lock:
            if stamp == self._stamp:
                return
            by_kid = {}
            for file in files:
                try:
                    device = parse_record(json.loads(file.read_text()), str(file))
                except (OSError, ValueError, KeyFileError):
                    continue
                by_kid[device.kid] = device
            self._by_kid, self._stamp = by_kid, stamp
