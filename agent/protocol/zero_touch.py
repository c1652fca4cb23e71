"""Zero-touch enrolment on the wire: a device's signed request with a one-time token, the centre's signed answer.

Topics sit outside the per-device tree, because the device has no place in it yet::

    <prefix>/_enrol/<client id>/request   the device's request (signed with its new key)
    <prefix>/_enrol/<client id>/result    the centre's answer (signed with the centre's key)

``_enrol`` can never be a site name (names start with a letter or digit). At the broker the
segment is the MQTT client id (``%c`` in the ACL), so an enrolling device publishes and reads
only under its own client id.

The request is self-signed: the JWS is checked with the public key the request itself carries,
which proves the sender holds that key; the token proves the installer meant it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from agent.errors import KeyFileError, SignatureInvalid
from agent.protocol.enrolment import EnrolledDevice, parse_record
from agent.protocol.messages import SCHEMA_VERSION, Name, Strict, UnixTime, decode_claims, parse_json_object
from agent.protocol.signing import ALGORITHM, MessageSigner, open_token, verify_opened

ENROL_SEGMENT = "_enrol"
MAX_REQUEST_BYTES = 16 * 1024
#: A token: 128 random bits (22 base64url characters) after this prefix; nothing shorter is a token.
TOKEN_PREFIX = "et1_"
TOKEN_PATTERN = r"^et1_[A-Za-z0-9_-]{22,86}$"
#: Why a request was refused, as the device and the centre's counters (``enrolment_<reason>``) see it.
REFUSALS = (
    "unknown", "used", "expired", "rejected", "wrong_site", "wrong_kind", "device_exists", "no_device_ca",
    "internal_error",
)  # fmt: skip


def enrolment_topic(prefix: str, client_id: str, which: Literal["request", "result"]) -> str:
    return f"{prefix.strip('/')}/{ENROL_SEGMENT}/{client_id}/{which}"


def request_filter(prefix: str) -> str:
    """What the receiver subscribes to: every enrolling client's request."""
    return f"{prefix.strip('/')}/{ENROL_SEGMENT}/+/request"


def client_of(prefix: str, topic: str) -> str | None:
    """The client id in a request topic, or None for any other topic."""
    parts = topic.split("/")
    head = prefix.strip("/").split("/")
    if len(parts) != len(head) + 3 or parts[: len(head)] != head or parts[len(head)] != ENROL_SEGMENT:
        return None
    return parts[-2] if parts[-1] == "request" and parts[-2] else None


class EnrolmentRequestClaims(Strict):
    """What a device sends: the token, its enrolment record (with its public key), and a CSR if it wants a certificate."""

    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["enrol-request"] = "enrol-request"
    request_id: uuid.UUID
    token: str = Field(pattern=TOKEN_PATTERN)
    record: dict[str, Any]
    csr: str | None = Field(None, max_length=8192)
    sent: float = UnixTime


class EnrolmentResultClaims(Strict):
    """The centre's answer: ``enrolled`` (with a certificate if a CSR came), ``pending`` (an operator decides) or
    ``refused`` with the reason."""

    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["enrol-result"] = "enrol-result"
    request_id: uuid.UUID
    device: str = Name
    site: str = Name
    kid: str = Field(min_length=1, max_length=128)
    outcome: Literal["enrolled", "pending", "refused"]
    reason: str | None = Field(None, max_length=64)
    detail: str = Field("", max_length=500)
    cert: str | None = Field(None, max_length=16384)
    sent: float = UnixTime


@dataclass(frozen=True)
class EnrolmentRequest:
    claims: EnrolmentRequestClaims
    device: EnrolledDevice


def sign_request(
    signer: MessageSigner,
    token: str,
    record: dict[str, Any],
    csr: str | None = None,
    request_id: uuid.UUID | None = None,
) -> tuple[str, uuid.UUID]:
    """A signed request (compact JWS) and its id; the same id is sent again on every retry."""
    request_id = request_id or uuid.uuid4()
    claims = {"v": SCHEMA_VERSION, "kind": "enrol-request", "request_id": str(request_id), "token": token}
    claims |= {"record": record, "sent": time.time()}
    if csr is not None:
        claims["csr"] = csr
    return signer.sign(claims), request_id


def parse_request(payload: bytes) -> EnrolmentRequest:
    """Check a request: size, Ed25519 only, strict claims, a valid record whose key signed it; SignatureInvalid otherwise."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise SignatureInvalid("oversized", f"{len(payload)} bytes, more than {MAX_REQUEST_BYTES}")
    opened = open_token(payload)
    if opened.header.get("alg") != ALGORITHM:
        raise SignatureInvalid("algorithm_not_allowed", f"algorithm {opened.header.get('alg')!r}; only Ed25519")
    unverified = parse_json_object(_payload_of(opened))
    try:
        device = parse_record(unverified.get("record"), "enrolment request")
    except KeyFileError as exc:
        raise SignatureInvalid("malformed", str(exc)) from None
    if opened.header.get("kid") != device.kid:
        raise SignatureInvalid("malformed", "the request is not signed with the key its record carries")
    claims = decode_claims(EnrolmentRequestClaims, verify_opened(opened, device.key))
    return EnrolmentRequest(claims, device)


def _payload_of(opened) -> bytes:
    payload = opened.compact.payload
    if not isinstance(payload, bytes):
        raise SignatureInvalid("malformed", "no payload")
    return payload
