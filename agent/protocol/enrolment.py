"""Enrolment records: what a device gives the centre to be trusted (``{"device_id", "site", "kind", "jwk"}``).

The key id is the JWK thumbprint, recomputed here rather than trusted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from joserfc.jwk import OKPKey

from agent.config.base import NAME_PATTERN
from agent.errors import KeyFileError
from agent.protocol.signing import key_id, public_jwk, public_key_from_jwk


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


@dataclass(frozen=True)
class EnrolledDevice:
    device_id: str
    site: str
    kind: str
    kid: str
    key: OKPKey
