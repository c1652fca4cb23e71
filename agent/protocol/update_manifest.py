"""Software update manifests the centre publishes: signed, addressed to one device, expiring.

``<prefix>/<site>/<device>/update`` carries, retained, a compact JWS over
:class:`UpdateClaims` signed with the centre's key: the agent version, where
to fetch the artefact (a wheel or sdist of edge-agent; ``https://``,
``http://`` or ``file://``), its size and sha256, the lowest device
configuration schema the new version reads, and the stage that chose the
device. A stage is a percentage (a device is in it when
:func:`in_percentage` says so: a hash of its id, the same at the centre and on
the device) or a list of device ids; the device checks it is in the stage
itself, so a copy re-published to the wrong topic is still refused.
"""

from __future__ import annotations

import hashlib
import time
from typing import Literal

from joserfc.jwk import OKPKey
from pydantic import Field, model_validator

from agent.errors import SignatureInvalid
from agent.protocol.messages import SCHEMA_VERSION, Name, Strict, UnixTime, decode_claims
from agent.protocol.signing import MessageSigner, open_token, verify_opened

#: The device configuration schema this agent reads (a new version needing a later one is refused).
CONFIG_SCHEMA = 1
MAX_MANIFEST_BYTES = 16 * 1024
#: Largest artefact a device downloads, whatever a manifest says.
MAX_ARTEFACT_BYTES = 64 * 1024 * 1024
VERSION_PATTERN = r"^[0-9]+(\.[0-9]+){0,3}((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?$"


class UpdateClaims(Strict):
    """The signed claims of one update manifest, addressed to one device."""

    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["update"] = "update"
    device: str = Name
    site: str = Name
    version: str = Field(min_length=1, max_length=40, pattern=VERSION_PATTERN)
    url: str = Field(min_length=8, max_length=1000, pattern=r"^(https?|file)://")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1, le=MAX_ARTEFACT_BYTES)
    filename: str = Field(min_length=5, max_length=200, pattern=r"^[A-Za-z0-9_.+-]+\.(whl|tar\.gz)$")
    min_config_schema: int = Field(1, ge=1, le=1000)
    stage_percent: float | None = Field(None, gt=0, le=100)
    stage_devices: list[str] | None = Field(None, min_length=1, max_length=10000)
    issued: float = UnixTime
    expires: float = UnixTime
    gate_s: float = Field(60.0, ge=5, le=3600, description="The test alert must be acknowledged within this.")

    @model_validator(mode="after")
    def _one_stage(self) -> UpdateClaims:
        if (self.stage_percent is None) == (self.stage_devices is None):
            raise ValueError("a manifest names exactly one stage: a percentage or a list of devices")
        return self

    def selects(self, device: str) -> bool:
        if self.stage_devices is not None:
            return device in self.stage_devices
        return in_percentage(device, self.stage_percent or 0.0)


def in_percentage(device: str, percent: float) -> bool:
    """Whether ``device`` falls in the first ``percent`` % of the fleet: a stable hash of its id, never random."""
    bucket = int.from_bytes(hashlib.sha256(f"edge-agent-stage:{device}".encode()).digest()[:8], "big") / 2**64
    return bucket * 100 < percent


def version_key(version: str):
    """A sortable key for a version string (PEP 440, through ``packaging`` or the copy pip brings along)."""
    try:
        from packaging.version import Version
    except ImportError:  # pragma: no cover - a device venv without packaging still has pip's
        from pip._vendor.packaging.version import Version
    return Version(version)


def sign_manifest(signer: MessageSigner, *, now: float | None = None, expires_in_s: float, **fields) -> str:
    """The compact JWS of one device's manifest; the claims are validated before they are signed."""
    now = time.time() if now is None else now
    claims = UpdateClaims(issued=now, expires=now + expires_in_s, **fields)
    return signer.sign(claims.model_dump(mode="json", exclude_none=True))


def open_manifest(token: bytes, centre_key: OKPKey) -> UpdateClaims:
    """Verify with the centre's key and validate strictly; every failure a SignatureInvalid with its reason."""
    if len(token) > MAX_MANIFEST_BYTES:
        raise SignatureInvalid("oversized", f"{len(token)} bytes, more than {MAX_MANIFEST_BYTES}")
    return decode_claims(UpdateClaims, verify_opened(open_token(token), centre_key))
