"""Enrolment records: what a device gives the centre to be trusted (``{"device_id", "site", "kind", "jwk"}``).

The key id is the JWK thumbprint, recomputed here rather than trusted. A record may also say where
the device is, for the centre's map: ``location`` (the mounted location, as text) and ``position``,
``{"lat", "lon"}`` (WGS84 degrees) and/or ``{"plan", "x", "y"}`` (coordinates on a named site plan).
Records without them (older ones) stay valid.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from joserfc.jwk import OKPKey

from agent.config.base import NAME_PATTERN
from agent.errors import KeyFileError
from agent.protocol.signing import key_id, public_jwk, public_key_from_jwk

#: Longest mounted-location text kept (as a button's ``location`` in the device config).
MAX_LOCATION = 200
#: Site-plan coordinates are in the plan's own units (metres, pixels); anything beyond this is a typo.
MAX_PLAN_COORDINATE = 1e7
DEFAULT_PLAN = "site"


@dataclass(frozen=True)
class Position:
    """Where a device is: WGS84 ``lat``/``lon`` in degrees, and/or ``x``/``y`` on the site plan ``plan``."""

    lat: float | None = None
    lon: float | None = None
    plan: str | None = None
    x: float | None = None
    y: float | None = None

    def as_record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def enrolment_record(
    device_id: str, site: str, kind: str, key: OKPKey, *, position: Position | None = None, location: str = ""
) -> dict[str, Any]:
    """What the centre needs to enrol a device; ``edge-agent keys init`` prints it."""
    record: dict[str, Any] = {
        "device_id": device_id,
        "site": site,
        "kind": kind,
        "kid": key_id(key),
        "jwk": public_jwk(key),
    }
    if position is not None:
        record["position"] = position.as_record()
    if location:
        record["location"] = location
    return record


def parse_record(record: Any, where: str) -> EnrolledDevice:
    """Check an enrolment record: names, kind, an Ed25519 public JWK, and the optional position and location."""
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
    position = parse_position(record.get("position"), where)
    location = record.get("location", "")
    if not isinstance(location, str) or len(location) > MAX_LOCATION:
        raise KeyFileError(f"{where}: location is text of at most {MAX_LOCATION} characters")
    return EnrolledDevice(
        record["device_id"], record["site"], str(record.get("kind", "")), kid, key, position, location
    )


def parse_position(value: Any, where: str) -> Position | None:
    """A record's ``position``: None when absent; lat/lon in range, plan x/y finite, each pair complete."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value or set(value) - {"lat", "lon", "plan", "x", "y"}:
        raise KeyFileError(f"{where}: position is an object with lat/lon and/or plan, x, y")
    lat = _coordinate(value, "lat", 90.0, where)
    lon = _coordinate(value, "lon", 180.0, where)
    x = _coordinate(value, "x", MAX_PLAN_COORDINATE, where)
    y = _coordinate(value, "y", MAX_PLAN_COORDINATE, where)
    if (lat is None) != (lon is None) or (x is None) != (y is None):
        raise KeyFileError(f"{where}: position needs both lat and lon, or both x and y")
    plan = value.get("plan")
    if x is None and plan is not None:
        raise KeyFileError(f"{where}: position names a plan but has no x and y on it")
    if x is not None:
        plan = DEFAULT_PLAN if plan is None else plan
        if not isinstance(plan, str) or not re.match(NAME_PATTERN, plan):
            raise KeyFileError(f"{where}: position plan {plan!r} is not a valid name (letters, digits, _ . -)")
    return Position(lat, lon, plan, x, y)


def _coordinate(value: dict[str, Any], name: str, limit: float, where: str) -> float | None:
    number = value.get(name)
    if number is None:
        return None
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        raise KeyFileError(f"{where}: position {name} {number!r} is not a finite number")
    if not -limit <= number <= limit:
        raise KeyFileError(f"{where}: position {name} {number} is outside -{limit:g}..{limit:g}")
    return float(number)


@dataclass(frozen=True)
class EnrolledDevice:
    device_id: str
    site: str
    kind: str
    kid: str
    key: OKPKey
    position: Position | None = None
    location: str = ""
