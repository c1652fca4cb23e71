"""On a camera box: answers the centre's evidence requests, once per request id, with the image sealed for the centre."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from joserfc.jwk import OKPKey

from agent.errors import SignatureInvalid
from agent.protocol.evidence import _NAME, REQUEST_MAX_AGE_S, USED_ID_MARGIN_S, RequestRefused
from agent.protocol.messages import EvidenceReply, EvidenceRequest, TopicLayout
from agent.protocol.sealing import MAX_SEALED_BYTES, CentreKeys, seal
from agent.protocol.signing import MessageSigner, verify_claims

log = logging.getLogger(__name__)


USED_IDS_FILE = "evidence-requests.sqlite"


_MAX_QUEUED = 16


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
