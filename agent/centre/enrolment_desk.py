"""The receiver's side of zero-touch enrolment: judge each request's token, enrol, and answer signed.

A request comes on ``<prefix>/_enrol/<client id>/request`` (see ``agent.protocol.zero_touch``).
A valid, unused, unexpired token for the request's site and kind enrols the device at once
(its record goes into the keyring, its CSR, if any, is signed by the device CA), or, for a token
made with ``--approve operator``, queues it for ``edge-agent centre enrolments approve ID``.
Every refusal has a reason (``unknown``, ``used``, ``expired``, ``rejected``, ``wrong_site``,
``wrong_kind``, ``device_exists``, ``no_device_ca``, ``malformed``), counted and sent back to the device.
A malformed request gets no answer: there is no verified key to answer.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.centre.enrolment_tokens import RequestRow, TokenBook, token_hash
from agent.centre.keyring import Keyring
from agent.errors import AgentError, ConfigError, KeyFileError, SignatureInvalid
from agent.protocol.signing import MessageSigner
from agent.protocol.zero_touch import EnrolmentRequest, client_of, enrolment_topic, parse_request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    outcome: str  # enrolled / pending / refused
    reason: str | None = None
    detail: str = ""
    cert: str | None = None


class EnrolmentDesk:
    """Decides enrolment requests; ``handle`` never raises (hostile input is a counted refusal)."""

    def __init__(self, book: TokenBook, keyring: Keyring, ca_dir, signer: MessageSigner, prefix: str, clock=time.time):
        self.book = book
        self.keyring = keyring
        self.ca_dir = ca_dir
        self.signer = signer
        self.prefix = prefix
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.on_decision: Callable[[str], None] = lambda outcome: None  # the receiver's metrics

    def takes(self, topic: str) -> bool:
        """Whether a topic is an enrolment request's (asked of every message: the cheap test first)."""
        return topic.endswith("/request") and client_of(self.prefix, topic) is not None

    def handle(self, topic: str, payload: bytes, publish) -> Decision | None:
        """Judge one request and publish the signed answer with ``publish(topic, bytes)``; None when unanswerable."""
        client_id = client_of(self.prefix, topic) or ""
        try:
            request = parse_request(payload)
        except SignatureInvalid as exc:
            self._count("malformed", f"from client {client_id!r}: {exc}")
            return None
        try:
            decision = self.decide(request, client_id)
        except Exception as exc:  # noqa: BLE001 - a failing store or CA costs this request, not the receiver
            log.exception("enrolment request from %r failed", client_id)
            decision = Decision("refused", "internal_error", f"{type(exc).__name__}: {exc}"[:500])
        self._count(decision.reason or decision.outcome, f"{request.device.site}/{request.device.device_id}")
        publish(enrolment_topic(self.prefix, client_id, "result"), self.answer(request, decision).encode())
        return decision

    def decide(self, request: EnrolmentRequest, client_id: str) -> Decision:
        """The token's verdict for this request, binding the token to the request's key when it is the first."""
        claims, device = request.claims, request.device
        hashed = token_hash(claims.token)
        now = self.clock()
        with self.book.store.transaction():
            row = self.book.token(hashed)
            if row is None:
                return Decision("refused", "unknown", "no such enrolment token")
            if row.state != "unused":
                return self._again(hashed, row.state, row.kid, device.kid)
            if row.expires_at < now:
                return Decision("refused", "expired", f"the token expired {now - row.expires_at:.0f} s ago")
            if device.site != row.site or device.kind != row.kind:
                which = "wrong_site" if device.site != row.site else "wrong_kind"
                return Decision("refused", which, f"the token is for {row.kind} devices at site {row.site}")
            self.keyring.look_now()  # an enrolment by another process a moment ago must count
            holder = next((d for d in self.keyring.devices() if d.device_id == device.device_id), None)
            if holder is not None and holder.kid != device.kid:
                return Decision("refused", "device_exists", f"{device.device_id} is enrolled with another key")
            if claims.csr is not None and not has_device_ca(self.ca_dir):  # the token stays unused
                return Decision(
                    "refused", "no_device_ca", "the box asks for a certificate; the centre has no device CA"
                )
            record = {**claims.record, "kid": device.kid}
            state = "pending" if row.approve == "operator" else "approved"
            self.book.add_request(hashed, client_id, record, claims.csr, state, now)
            self.book.bind(hashed, "pending" if state == "pending" else "used", device.device_id, device.kid, now)
            if state == "pending":
                log.warning(
                    "ENROLMENT PENDING %s/%s: approve with 'edge-agent centre enrolments approve'",
                    device.site,
                    device.device_id,
                )
                return Decision("pending", detail="waiting for an operator's approval")
            request_row = self.book.request_for(hashed)
            assert request_row is not None
            return self._enrol(request_row, now)

    def _again(self, hashed: str, state: str, bound_kid: str | None, kid: str) -> Decision:
        """A token already presented: the same key gets the same answer again, another key is refused."""
        if bound_kid != kid:
            return Decision("refused", "used", "the token has already been used")
        previous = self.book.request_for(hashed)
        if state == "pending":
            return Decision("pending", detail="waiting for an operator's approval")
        if state == "rejected" or previous is None or previous.state != "approved":
            reason = previous.reason if previous is not None and previous.reason else "rejected"
            return Decision("refused", "rejected", reason)
        return Decision("enrolled", cert=previous.cert)

    def _enrol(self, request: RequestRow, now: float) -> Decision:
        return settle(self.book, self.keyring, self.ca_dir, request, now)

    def answer(self, request: EnrolmentRequest, decision: Decision) -> str:
        device = request.device
        claims: dict[str, Any] = {
            "v": 1, "kind": "enrol-result", "request_id": str(request.claims.request_id), "device": device.device_id,
            "site": device.site, "kid": device.kid, "outcome": decision.outcome, "reason": decision.reason,
            "detail": decision.detail[:500], "cert": decision.cert, "sent": self.clock(),
        }  # fmt: skip
        return self.signer.sign(claims)

    def _count(self, what: str, detail: str) -> None:
        self.counters[f"enrolment_{what}"] += 1
        self.on_decision(what)
        if what in ("enrolled", "pending"):
            log.info("enrolment %s: %s", what, detail)
        else:
            log.warning("enrolment refused (%s): %s", what, detail)


def settle(book: TokenBook, keyring: Keyring, ca_dir, request: RequestRow, now: float) -> Decision:
    """Enrol a request and record the outcome on it and its token (inside the caller's transaction)."""
    decision = enrol_request(keyring, ca_dir, request)
    enrolled = decision.outcome == "enrolled"
    book.decide(request.id, "approved" if enrolled else "rejected", now, cert=decision.cert, reason=decision.reason)
    book.bind(request.token_hash, "used" if enrolled else "rejected", request.device, request.kid, now)
    if enrolled:
        log.info("enrolled %s/%s (key %s) with a one-time token", request.site, request.device, request.kid)
    return decision


def approve(book: TokenBook, keyring: Keyring, ca_dir, request_id: int, now: float) -> Decision:
    """An operator's yes to a pending request: enrolled now; the device hears it when it next asks."""
    with book.store.transaction():
        request = _pending(book, request_id)
        return settle(book, keyring, ca_dir, request, now)


def reject(book: TokenBook, request_id: int, reason: str, now: float) -> None:
    """An operator's no: the request and its token are rejected; the device is told so when it next asks."""
    with book.store.transaction():
        request = _pending(book, request_id)
        book.decide(request.id, "rejected", now, reason=reason)
        book.bind(request.token_hash, "rejected", request.device, request.kid, now)


def _pending(book: TokenBook, request_id: int) -> RequestRow:
    request = book.request(request_id)
    if request is None:
        raise ConfigError(f"no enrolment request {request_id}")
    if request.state != "pending":
        raise ConfigError(f"enrolment request {request_id} is {request.state}, not pending")
    return request


def enrol_request(keyring: Keyring, ca_dir, request: RequestRow) -> Decision:
    """Enrol one request's record; with a CSR and a device CA, return the signed certificate too."""
    cert = None
    try:
        if request.csr is not None:
            cert = _issue(ca_dir, request)
        keyring.enroll(request.record, f"enrolment request {request.id}")
    except (AgentError, KeyFileError, ConfigError) as exc:
        return Decision("refused", "malformed", str(exc)[:500])
    return Decision("enrolled", cert=cert)


def has_device_ca(ca_dir) -> bool:
    from agent.centre.ca import CA_KEY

    return (Path(ca_dir) / CA_KEY).is_file()


def _issue(ca_dir, request: RequestRow) -> str:
    from agent.centre.ca import DeviceCA, device_identity, pem_cert

    ca = DeviceCA(ca_dir)
    if not has_device_ca(ca_dir):
        raise ConfigError(f"request {request.id} has a CSR but there is no device CA in {ca.directory}")
    cert = ca.issue_for_csr(request.csr, device_identity(request.site, request.device), f"enrolment {request.id}")
    return pem_cert(cert).decode()
