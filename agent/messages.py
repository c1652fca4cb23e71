"""What travels between devices and the centre: claim sets and the topic layout.

Topics::

    <prefix>/<site>/<device>/alert      alerts from buttons (and test alerts)   QoS 1
    <prefix>/<site>/<device>/event      tamper and other device events          QoS 1
    <prefix>/<site>/<device>/telemetry  heartbeats                              QoS 1
    <prefix>/<site>/<device>/status     retained online/offline (last will)     QoS 1
    <prefix>/<site>/<device>/ack        the centre's signed acknowledgements    QoS 1
    <prefix>/<site>/<device>/evidence-request   the centre asks for an evidence image (signed)
    <prefix>/<site>/<device>/evidence   the device's reply: the redacted JPEG encrypted for the centre (signed)

Every payload is a compact JWS (see ``signing``) over a :class:`MessageClaims`
set. ``created`` is when the event happened; ``sent`` is when this copy was
signed for transmission, so a retransmission after an outage still passes the
receiver's time window while ``created`` keeps the true time.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
Kind = Literal["alert", "tamper", "test", "telemetry", "status", "event"]
CHANNELS = ("alert", "event", "telemetry", "status", "ack", "evidence-request", "evidence")
CHANNEL_OF_KIND: dict[str, str] = {
    "alert": "alert",
    "test": "event",
    "tamper": "event",
    "event": "event",
    "telemetry": "telemetry",
    "status": "status",
}
#: Kinds the centre acknowledges; the device keeps them until that ack arrives.
ACKNOWLEDGED_KINDS = frozenset({"alert", "tamper", "test", "event"})


class MessageClaims(BaseModel):
    """The signed claims of every device message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    device: str = Field(min_length=1, max_length=64)
    site: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=1, description="Strictly increasing per device, across restarts.")
    event_id: uuid.UUID
    created: float = Field(description="Unix time the event happened.")
    sent: float = Field(description="Unix time this copy was signed for sending.")
    kind: Kind
    test: bool = False
    body: dict[str, Any] = Field(default_factory=dict)


class AckClaims(BaseModel):
    """The centre's signed acknowledgement of one device message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["ack"] = "ack"
    receiver: str
    device: str
    seq: int
    event_id: uuid.UUID
    stored_at: float
    sent: float
    duplicate: bool = False


def new_claims(
    *,
    device: str,
    site: str,
    seq: int,
    kind: str,
    body: dict[str, Any],
    test: bool = False,
    created: float | None = None,
) -> dict[str, Any]:
    """Claims for a new event; ``sent`` is filled in each time a copy is signed."""
    now = time.time() if created is None else created
    return {
        "v": SCHEMA_VERSION,
        "device": device,
        "site": site,
        "seq": seq,
        "event_id": str(uuid.uuid4()),
        "created": now,
        "sent": now,
        "kind": kind,
        "test": test,
        "body": body,
    }


class TopicLayout:
    """Builds and parses ``<prefix>/<site>/<device>/<channel>`` topics."""

    def __init__(self, prefix: str):
        self.prefix = prefix.strip("/")
        self._depth = len(self.prefix.split("/"))

    def topic(self, site: str, device: str, channel: str) -> str:
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {', '.join(CHANNELS)}")
        return f"{self.prefix}/{site}/{device}/{channel}"

    def for_kind(self, site: str, device: str, kind: str) -> str:
        return self.topic(site, device, CHANNEL_OF_KIND[kind])

    def parse(self, topic: str) -> tuple[str, str, str] | None:
        """``(site, device, channel)`` or None for a topic outside the layout."""
        parts = topic.split("/")
        if len(parts) != self._depth + 3 or "/".join(parts[: self._depth]) != self.prefix:
            return None
        site, device, channel = parts[self._depth :]
        return (site, device, channel) if channel in CHANNELS else None


class EvidenceRequest(BaseModel):
    """The centre asks a device for one evidence image named in a signed alert."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["evidence-request"] = "evidence-request"
    device: str
    ref: str = Field(pattern=r"^evidence/[0-9a-f-]{36}\.jpg$", description="As given in the alert's body.")
    request_id: uuid.UUID = Field(description="Single use: the device answers each id once.")
    sent: float


class EvidenceReply(BaseModel):
    """The device's answer: the JPEG sealed for the centre, or why there is none.

    The image travels only as a compact JWE for the centre's X25519 key (see
    ``sealing``); ``sha256`` is the plaintext's, which the centre checks against
    the signed alert after opening it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["evidence"] = "evidence"
    device: str
    ref: str
    request_id: uuid.UUID
    sent: float
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Of the plaintext JPEG.")
    jpeg_jwe: str | None = Field(None, description="The JPEG as a compact JWE (ECDH-ES, A256GCM) for the centre.")
    error: str | None = None
