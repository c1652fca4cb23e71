"""Evidence images travel separately from alerts, and only when the centre asks.

An alert carries ``evidence: {ref, sha256}``. The centre publishes a request
signed with its key on ``…/evidence-request``; the device checks that
signature and the request's age, and replies on ``…/evidence`` with the JPEG,
signed with the device key. The fetcher checks the reply's signature and that
the image hashes to what the signed alert promised.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import AgentError, SignatureInvalid
from .messages import EvidenceReply, EvidenceRequest, TopicLayout
from .signing import MessageSigner, unverified_header, verify

log = logging.getLogger(__name__)

REQUEST_MAX_AGE_S = 60.0
_NAME = re.compile(r"^evidence/([0-9a-f-]{36}\.jpg)$")


class EvidenceError(AgentError, LookupError):
    """Evidence could not be fetched: not found, expired, or not what the alert promised."""


def answer_request(
    payload: bytes, *, device: str, centre_key: Any, signer: MessageSigner, evidence_dir: Path, now: float | None = None
) -> bytes | None:
    """The signed reply to a request, or None for a request that is not genuine (logged)."""
    now = time.time() if now is None else now
    try:
        request = EvidenceRequest.model_validate(verify(payload, centre_key))
    except (SignatureInvalid, ValidationError) as exc:
        log.warning("ignored evidence request: %s", exc)
        return None
    if request.device != device or abs(now - request.sent) > REQUEST_MAX_AGE_S:
        log.warning("ignored evidence request for %s sent %.0f s ago", request.device, now - request.sent)
        return None
    reply: dict[str, Any] = {"device": device, "ref": request.ref, "request_id": str(request.request_id), "sent": now}
    path = evidence_dir / _NAME.match(request.ref).group(1)
    try:
        data = path.read_bytes()
        reply.update(sha256=hashlib.sha256(data).hexdigest(), jpeg_b64=base64.b64encode(data).decode())
    except FileNotFoundError:
        reply["error"] = "not found: expired (retention) or never stored"
    log.info("evidence %s requested by the centre: %s", request.ref, reply.get("error") or "sent")
    return signer.sign(EvidenceReply(**reply).model_dump(mode="json"), large=True).encode()


class EvidenceServer:
    """On a camera box: answers the centre's evidence requests, off paho's network thread."""

    def __init__(
        self,
        link,
        topics: TopicLayout,
        *,
        site: str,
        device: str,
        signer: MessageSigner,
        centre_key: Any,
        evidence_dir: Path,
    ):
        self.link = link
        self.request_topic = topics.topic(site, device, "evidence-request")
        self.reply_topic = topics.topic(site, device, "evidence")
        self.device, self.signer, self.centre_key, self.evidence_dir = device, signer, centre_key, evidence_dir
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="evidence")
        link.subscribe(self.request_topic)

    def submit(self, payload: bytes) -> None:
        self._worker.submit(self._answer, payload)

    def _answer(self, payload: bytes) -> None:
        reply = answer_request(
            payload, device=self.device, centre_key=self.centre_key, signer=self.signer, evidence_dir=self.evidence_dir
        )
        if reply is not None:
            self.link.publish(self.reply_topic, reply)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def fetch(
    link,
    topics: TopicLayout,
    signer: MessageSigner,
    keyring,
    *,
    site: str,
    device: str,
    ref: str,
    expected_sha256: str,
    timeout_s: float = 15.0,
) -> bytes:
    """Ask a device for evidence over an open MqttLink; returns the JPEG after checking it."""
    replies: list[bytes] = []
    arrived = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        replies.append(payload)
        arrived.set()

    link.on_message = on_message
    link.subscribe(topics.topic(site, device, "evidence"))
    time.sleep(0.3)
    request_id = str(uuid.uuid4())
    request = EvidenceRequest(device=device, ref=ref, request_id=request_id, sent=time.time())
    link.publish(topics.topic(site, device, "evidence-request"), signer.sign(request.model_dump(mode="json")).encode())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        arrived.wait(0.1)
        arrived.clear()
        for payload in list(replies):
            enrolled = keyring.lookup(str(unverified_header(payload, large=True).get("kid")))
            if enrolled is None or enrolled.device_id != device:
                continue
            reply = EvidenceReply.model_validate(verify(payload, enrolled.key, large=True))
            if str(reply.request_id) != request_id:
                continue
            if reply.error:
                raise EvidenceError(f"{site}/{device} has no {ref}: {reply.error}")
            data = base64.b64decode(reply.jpeg_b64 or "")
            if hashlib.sha256(data).hexdigest() != expected_sha256:
                raise EvidenceError(f"{ref} from {site}/{device} does not match the sha256 in its signed alert")
            return data
    raise EvidenceError(f"no answer from {site}/{device} within {timeout_s:g} s (is it online?)")
