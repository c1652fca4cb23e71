"""The centre's keyring: one JSON file per enrolled device, holding its public JWK.

An enrolment record is what ``edge-agent keys init`` (and later
``provision``) prints: ``{"device_id", "site", "kind", "jwk": {...}}``. The
key id is the JWK thumbprint, recomputed here rather than trusted. The
directory is re-read when it changes, so enrolling needs no restart.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc.jwk import OKPKey

from .config_base import NAME_PATTERN
from .errors import KeyFileError
from .signing import key_id, public_jwk, public_key_from_jwk


@dataclass(frozen=True)
class EnrolledDevice:
    device_id: str
    site: str
    kind: str
    kid: str
    key: OKPKey


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


def enrolment_record(device_id: str, site: str, kind: str, key: OKPKey) -> dict[str, Any]:
    """What the centre needs to enrol a device; ``edge-agent keys init`` prints it."""
    return {"device_id": device_id, "site": site, "kind": kind, "kid": key_id(key), "jwk": public_jwk(key)}


def parse_record(record: Any, where: str) -> EnrolledDevice:
    """Check an enrolment record: names, kind and an Ed25519 public JWK."""
    if not isinstance(record, dict):
        raise KeyFileError(f"{where}: an enrolment record is a JSON object")
    for field in ("device_id", "site", "jwk"):
        if field not in record:
            raise KeyFileError(f"{where}: missing '{field}' (expected the JSON printed by 'edge-agent keys init')")
    for field in ("device_id", "site"):
        if not isinstance(record[field], str) or not re.match(NAME_PATTERN, record[field]):
            raise KeyFileError(f"{where}: {field} {record[field]!r} is not a valid name (letters, digits, _ . -)")
    key = public_key_from_jwk(record["jwk"], f"{where}: jwk")
    kid = key_id(key)
    claimed = record["jwk"].get("kid")
    if claimed is not None and claimed != kid:
        raise KeyFileError(f"{where}: jwk kid {claimed!r} is not the key's thumbprint {kid!r}")
    return EnrolledDevice(record["device_id"], record["site"], str(record.get("kind", "")), kid, key)
