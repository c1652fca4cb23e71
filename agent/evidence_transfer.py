"""Evidence images travel separately from alerts, only when the centre asks, and only sealed for the centre.

An alert carries ``evidence: {ref, sha256}``. The centre publishes a request
signed with its key on ``…/evidence-request``; the device checks that
signature, the request's age and that the request id was never answered before
(used ids are kept on disk while a request could still be fresh, so a replay is
refused across restarts too). It replies on ``…/evidence`` with the JPEG
encrypted for the centre's X25519 key (a JWE, see ``sealing``) inside claims
signed with the device key. The fetcher checks the signature and request id,
opens the JWE with the centre's private key and checks that the image hashes to
what the signed alert promised. Nothing on the broker carries the image in clear.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from joserfc.jwk import OKPKey

from .errors import AgentError, SignatureInvalid
from .messages import EvidenceReply, EvidenceRequest, TopicLayout
from .sealing import MAX_SEALED_BYTES, CentreKeys, SealedDataInvalid, seal, unseal
from .signing import MessageSigner, unverified_header, verify_claims

log = logging.getLogger(__name__)

REQUEST_MAX_AGE_S = 60.0
#: Used request ids are kept this much longer than their window, so a small clock step back changes nothing.
USED_ID_MARGIN_S = REQUEST_MAX_AGE_S
USED_IDS_FILE = "evidence-requests.sqlite"
_MAX_QUEUED = 16
_NAME = re.compile(r"^evidence/([0-9a-f-]{36}\.jpg)$")


class EvidenceError(AgentError, LookupError):
    """Evidence could not be fetched: not found, expired, or not what the alert promised."""


class RequestRefused(EvidenceError):
    """An evidence request the device does not answer; ``reason`` is the counter it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ReplyIgnored(EvidenceError):
    """A message on the evidence topic that is not the authentic answer to our request (keep waiting)."""


class Answer(NamedTuple):
    payload: bytes
    image_sent: bool


def require_sealing_key(rules: list[Any], centre_keys: CentreKeys) -> None:
    """A camera box whose rules take evidence must hold the centre's encryption key: a ConfigError at start."""
    taking = [rule.name for rule in rules if rule.evidence]
    if taking:
        centre_keys.require_encryption(f"rule(s) {', '.join(taking)} set evidence = true")


class UsedRequests:
    """Request ids already answered, in a small SQLite file, kept while a replay could still look fresh."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # 0600 before SQLite opens it (journals follow)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS used_requests (request_id TEXT PRIMARY KEY, keep_until REAL)")

    def claim(self, request_id: str, keep_until: float, now: float) -> bool:
        """Record the id; False if it was already used. Prunes ids whose requests can no longer be fresh."""
        with self._lock:
            self._db.execute("DELETE FROM used_requests WHERE keep_until < ?", (now,))
            try:
                self._db.execute("INSERT INTO used_requests VALUES (?, ?)", (request_id, keep_until))
            except sqlite3.IntegrityError:
                return False
            return True

    def close(self) -> None:
        with self._lock:
            self._db.close()


def answer_request(
    payload: bytes,
    *,
    device: str,
    centre_keys: CentreKeys,
    signer: MessageSigner,
    evidence_dir: Path,
    used: UsedRequests,
    now: float | None = None,
) -> Answer:
    """The signed reply to a genuine, fresh, first-seen request; raises RequestRefused otherwise."""
    now = time.time() if now is None else now
    request = _genuine_request(payload, centre_keys.signing)
    if request.device != device:
        raise RequestRefused("wrong_device", f"request is for {request.device!r}, this is {device!r}")
    if abs(now - request.sent) > REQUEST_MAX_AGE_S:
        raise RequestRefused("stale", f"request {request.request_id} was sent {now - request.sent:.0f} s ago")
    keep_until = request.sent + REQUEST_MAX_AGE_S + USED_ID_MARGIN_S
    if not used.claim(str(request.request_id), keep_until, now):
        raise RequestRefused("replayed", f"request {request.request_id} was already answered")
    reply: dict[str, Any] = {"device": device, "ref": request.ref, "request_id": str(request.request_id), "sent": now}
    reply.update(_sealed_image(evidence_dir / _NAME.match(request.ref).group(1), centre_keys.encryption))
    log.info("evidence %s requested by the centre: %s", request.ref, reply.get("error") or "sent, sealed")
    signed = signer.sign(EvidenceReply(**reply).model_dump(mode="json"), large=True).encode()
    return Answer(signed, "jpeg_jwe" in reply)


def _genuine_request(payload: bytes, centre_signing_key: OKPKey) -> EvidenceRequest:
    try:
        return verify_claims(EvidenceRequest, payload, centre_signing_key)
    except SignatureInvalid as exc:
        raise RequestRefused(exc.reason, str(exc)) from None


def _sealed_image(path: Path, centre_encryption_key: OKPKey | None) -> dict[str, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {"error": "not found: expired (retention) or never stored"}
    if centre_encryption_key is None:
        return {"error": "this device holds no encryption key for the centre, so it sends no images"}
    if len(data) > MAX_SEALED_BYTES:
        return {"error": f"too large to send: {len(data)} bytes (at most {MAX_SEALED_BYTES})"}
    return {"sha256": hashlib.sha256(data).hexdigest(), "jpeg_jwe": seal(data, centre_encryption_key)}


class EvidenceServer:
    """On a camera box: answers the centre's evidence requests, off paho's network thread.

    Every request that is not answered is logged and counted under its reason
    (``counters``); an exception while answering is counted as ``error``, and the
    worker carries on with the next request.
    """

    def __init__(
        self,
        link,
        topics: TopicLayout,
        *,
        site: str,
        device: str,
        signer: MessageSigner,
        centre_keys: CentreKeys,
        evidence_dir: Path,
        state_dir: Path,
    ):
        self.link = link
        self.request_topic = topics.topic(site, device, "evidence-request")
        self.reply_topic = topics.topic(site, device, "evidence")
        self.device, self.signer, self.centre_keys, self.evidence_dir = device, signer, centre_keys, evidence_dir
        self.used = UsedRequests(state_dir / USED_IDS_FILE)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._queued = 0
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="evidence")
        link.subscribe(self.request_topic)

    @property
    def counters(self) -> dict[str, int]:
        """Requests by outcome: ``images_sent``, ``answered_without_image``, and each refusal reason."""
        with self._lock:
            return dict(sorted(self._counts.items()))

    def submit(self, payload: bytes) -> None:
        """Queue a request (called on paho's thread: never blocks); a flood beyond a few is dropped, counted."""
        with self._lock:
            if self._queued >= _MAX_QUEUED:
                self._counts["dropped_busy"] += 1
                return
            self._queued += 1
        try:
            self._worker.submit(self._answer, payload)
        except RuntimeError:  # closing
            with self._lock:
                self._queued -= 1

    def answer(self, payload: bytes, now: float | None = None) -> Answer:
        """The reply to one request, or RequestRefused."""
        return answer_request(
            payload,
            device=self.device,
            centre_keys=self.centre_keys,
            signer=self.signer,
            evidence_dir=self.evidence_dir,
            used=self.used,
            now=now,
        )

    def _answer(self, payload: bytes) -> None:
        try:
            answer = self.answer(payload)
            self.link.publish(self.reply_topic, answer.payload)
            self._count("images_sent" if answer.image_sent else "answered_without_image")
        except RequestRefused as exc:
            self._count(exc.reason)
            log.warning("refused an evidence request (%s): %s", exc.reason, exc)
        except Exception as exc:  # noqa: BLE001 - a hostile request or a failing disk must not stop the worker
            self._count("error")
            log.error("evidence request failed: %s: %s", type(exc).__name__, exc)
        finally:
            with self._lock:
                self._queued -= 1

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        self.used.close()


def fetch(
    link,
    topics: TopicLayout,
    signer: MessageSigner,
    keyring,
    decryption_key: OKPKey,
    *,
    site: str,
    device: str,
    ref: str,
    expected_sha256: str,
    timeout_s: float = 15.0,
) -> bytes:
    """Ask a device for evidence over an open MqttLink; returns the JPEG after opening and checking it."""
    deadline = time.monotonic() + timeout_s
    replies: queue.Queue[bytes] = queue.Queue()
    link.on_message = lambda topic, payload: replies.put(payload)
    link.subscribe(topics.topic(site, device, "evidence"))
    if not link.wait_subscribed(timeout_s):
        raise EvidenceError(f"the broker did not confirm the subscription to {site}/{device}'s evidence topic")
    request_id = str(uuid.uuid4())
    request = EvidenceRequest(device=device, ref=ref, request_id=request_id, sent=time.time())
    link.publish(topics.topic(site, device, "evidence-request"), signer.sign(request.model_dump(mode="json")).encode())
    ignored: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            payload = replies.get(timeout=left)
        except queue.Empty:
            break
        try:
            return open_reply(
                payload,
                keyring=keyring,
                decryption_key=decryption_key,
                device=device,
                ref=ref,
                request_id=request_id,
                expected_sha256=expected_sha256,
            )
        except ReplyIgnored as exc:
            log.warning("ignored a message on %s/%s's evidence topic: %s", site, device, exc)
            ignored.append(str(exc))
    why = f"; ignored {len(ignored)} message(s), the last: {ignored[-1]}" if ignored else " (is it online?)"
    raise EvidenceError(f"no valid answer from {site}/{device} within {timeout_s:g} s{why}")


def open_reply(
    payload: bytes,
    *,
    keyring,
    decryption_key: OKPKey,
    device: str,
    ref: str,
    request_id: str,
    expected_sha256: str,
) -> bytes:
    """The JPEG in an authentic reply to our request. ReplyIgnored: not that reply; EvidenceError: it failed."""
    reply = _authentic_reply(payload, keyring, device)
    if str(reply.request_id) != request_id:
        raise ReplyIgnored(f"answers request {reply.request_id}, not ours ({request_id})")
    if reply.device != device or reply.ref != ref:
        raise EvidenceError(f"{device} answered about {reply.device}/{reply.ref}, not {ref}")
    if reply.error:
        raise EvidenceError(f"{device} has no {ref}: {reply.error}")
    if reply.jpeg_jwe is None or reply.sha256 != expected_sha256:
        raise EvidenceError(f"{ref} from {device} does not match the sha256 in its signed alert")
    try:
        data = unseal(reply.jpeg_jwe, decryption_key)
    except SealedDataInvalid as exc:
        raise EvidenceError(f"{ref} from {device} cannot be opened with this centre's key: {exc}") from None
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise EvidenceError(f"{ref} from {device} does not match the sha256 in its signed alert")
    return data


def _authentic_reply(payload: bytes, keyring, device: str) -> EvidenceReply:
    try:
        kid = unverified_header(payload, large=True).get("kid")
        enrolled = keyring.lookup(str(kid))
        if enrolled is None or enrolled.device_id != device:
            raise ReplyIgnored(f"signed with key {kid!r}, which is not {device}'s enrolled key")
        return verify_claims(EvidenceReply, payload, enrolled.key, large=True)
    except SignatureInvalid as exc:
        raise ReplyIgnored(f"{exc.reason}: {exc}") from None
