"""What travels between devices and the centre: claim sets and the topic layout.

Topics::

    <prefix>/<site>/<device>/alert      alerts from buttons (and test alerts)   QoS 1
    <prefix>/<site>/<device>/event      tamper and other device events          QoS 1
    <prefix>/<site>/<device>/telemetry  heartbeats                              QoS 1
    <prefix>/<site>/<device>/status     retained online/offline (last will)     QoS 1
    <prefix>/<site>/<device>/ack        the centre's signed acknowledgements    QoS 1
                                        and "responding" (help is coming)       QoS 1
    <prefix>/<site>/<device>/evidence-request   the centre asks for an evidence image (signed)
    <prefix>/<site>/<device>/evidence   the device's reply: the redacted JPEG encrypted for the centre (signed)
    <prefix>/<site>/<device>/config     the centre's pushed configuration, retained (signed; see config_doc)
    <prefix>/<site>/<device>/update     the centre's software update manifest, retained (see update_manifest)
    <prefix>/<site>/<device>/command    the centre's single-use commands (signed; see commands)

Every payload is a compact JWS (see ``signing``) over a :class:`MessageClaims`
set. ``created`` is when the event happened; ``sent`` is when this copy was
signed for transmission, so a retransmission after an outage still passes the
receiver's time window while ``created`` keeps the true time.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import SignatureInvalid

SCHEMA_VERSION = 1
Kind = Literal["alert", "tamper", "test", "telemetry", "status", "event"]
CHANNELS = (
    "alert",
    "event",
    "telemetry",
    "status",
    "ack",
    "evidence-request",
    "evidence",
    "config",
    "command",
    "update",
)
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
#: Largest sequence number: every JSON implementation holds it exactly (IEEE double), as SQLite does.
MAX_SEQ = 2**53 - 1
#: Deepest nesting of arrays and objects accepted in a signed payload, checked before parsing.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_BARE_WORD = re.compile(rb"[A-Za-z]+")
_JSON_WORDS = frozenset((b"true", b"false", b"null", b"e", b"E"))

Sequence = Field(ge=1, le=MAX_SEQ, description="Strictly increasing per device, across restarts.")
UnixTime = Field(ge=0, le=2**34, description="Unix time in seconds; finite.")
Name = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Strict(BaseModel):
    """Claims read from the wire: no NaN or infinity, no unknown keys; ``decode_claims`` adds: no coercion
    ("123" is not a number, "false" is not a boolean)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MessageClaims(Strict):
    """The signed claims of every device message."""

    v: Literal[1] = SCHEMA_VERSION
    device: str = Name
    site: str = Name
    seq: int = Sequence
    event_id: uuid.UUID
    created: float = UnixTime
    sent: float = UnixTime
    kind: Kind
    test: bool = False
    body: dict[str, Any] = Field(default_factory=dict)
    prev: int | None = Field(
        None, ge=0, le=MAX_SEQ, description="For kinds the centre acknowledges: the previous such seq (0: none)."
    )
    clock_error_s: float = Field(
        0.0, ge=-(2**31), le=2**31, description="How far off the device's clock was found (it signs corrected time)."
    )


class AckClaims(Strict):
    """The centre's signed answer to one device message: ``ack`` (stored) or ``nak`` (refused, with ``reason``).

    ``sent`` is the centre's clock: the device learns its own clock's offset from it.
    """

    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["ack", "nak"] = "ack"
    reason: Literal["stale", "store_failed"] | None = None
    receiver: str = Field(min_length=1, max_length=128)
    device: str = Name
    seq: int = Sequence
    event_id: uuid.UUID
    stored_at: float = UnixTime
    sent: float = UnixTime
    reply_to_sent: float | None = Field(None, ge=0, le=2**34, description="The answered copy's own send time.")
    duplicate: bool = False


#: A "responding" message older (or further ahead) than this by the device's corrected clock is refused.
RESPONDING_MAX_AGE_S = 300.0


class RespondingClaims(Strict):
    """The centre tells a device that help is coming for one of its alerts (an operator took charge of it).

    Sent on the device's ``ack`` topic, signed with the centre's key. It names the alert (``seq`` and
    ``event_id``) and never who responds: operator names and other personal data stay at the centre.
    ``id`` makes each message single-use on the device; ``sent`` bounds it in time.
    """

    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["responding"]
    centre: str = Field(min_length=1, max_length=128)
    device: str = Name
    seq: int = Sequence
    event_id: uuid.UUID
    id: uuid.UUID
    sent: float = UnixTime


def check_json_depth(payload: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse deeply nested JSON before any parser recurses into it."""
    _check_depth(_JSON_STRING.sub(b'""', payload), max_depth)


def _check_depth(outside_strings: bytes, max_depth: int) -> None:
    depth = 0
    for bracket in outside_strings.translate(None, _BRACKETS):
        depth += 1 if bracket in b"[{" else -1
        if depth > max_depth:
            raise SignatureInvalid("malformed", f"JSON nested deeper than {max_depth} levels")


def check_json_text(payload: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse deep nesting, and the bare words Python's and pydantic's parsers take but JSON has not (NaN, Infinity).

    Outside its strings, JSON has no words but true, false, null and a number's exponent; what pydantic
    parses after this is then strict JSON, parsed once.
    """
    outside = _JSON_STRING.sub(b'""', payload)
    _check_depth(outside, max_depth)
    for word in _BARE_WORD.findall(outside):
        if word not in _JSON_WORDS:
            raise SignatureInvalid("malformed", f"signed payload is not JSON: {word[:20].decode('ascii')!r}")


def parse_json_object(payload: bytes) -> dict[str, Any]:
    """A signed payload as a dict: depth-checked first, strictly JSON (no NaN), an object."""
    check_json_depth(payload)
    try:
        value = json.loads(payload, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise SignatureInvalid("malformed", f"signed payload is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SignatureInvalid("malformed", "signed payload is not a JSON object")
    return value


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


Claims = TypeVar("Claims", bound=BaseModel)


def decode_claims(model: type[Claims], payload: bytes) -> Claims:
    """Validate a verified payload against a claims model; any failure is ``malformed``."""
    check_json_text(payload)  # depth and NaN before pydantic sees it; pydantic refuses anything but an object
    try:
        return model.model_validate_json(payload, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise SignatureInvalid("malformed", f"claims invalid at {where}: {first['msg']}") from None


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
        self._head = self.prefix + "/"

    def topic(self, site: str, device: str, channel: str) -> str:
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}; expected one of {', '.join(CHANNELS)}")
        return f"{self.prefix}/{site}/{device}/{channel}"

    def for_kind(self, site: str, device: str, kind: str) -> str:
        return self.topic(site, device, CHANNEL_OF_KIND[kind])

    def parse(self, topic: str) -> tuple[str, str, str] | None:
        """``(site, device, channel)`` or None for a topic outside the layout."""
        if not topic.startswith(self._head):
            return None
        parts = topic[len(self._head) :].split("/")
        if len(parts) != 3:
            return None
        site, device, channel = parts
        return (site, device, channel) if channel in CHANNELS else None


class EvidenceRequest(Strict):
    """The centre asks a device for one evidence image named in a signed alert."""

    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["evidence-request"] = "evidence-request"
    device: str
    ref: str = Field(pattern=r"^evidence/[0-9a-f-]{36}\.jpg$", description="As given in the alert's body.")
    request_id: uuid.UUID = Field(description="Single use: the device answers each id once.")
    sent: float = UnixTime


class EvidenceReply(Strict):
    """The device's answer: the JPEG sealed for the centre, or why there is none.

    The image travels only as a compact JWE for the centre's X25519 key (see
    ``sealing``); ``sha256`` is the plaintext's, which the centre checks against
    the signed alert after opening it.
    """

    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["evidence"] = "evidence"
    device: str
    ref: str
    request_id: uuid.UUID
    sent: float = UnixTime
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Of the plaintext JPEG.")
    jpeg_jwe: str | None = Field(None, description="The JPEG as a compact JWE (ECDH-ES, A256GCM) for the centre.")
    error: str | None = None
