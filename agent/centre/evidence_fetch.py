"""At the centre: asks a device for an evidence image and checks the reply (signature, request id, seal, sha256)."""

from __future__ import annotations

import hashlib
import logging
import queue
import time
import uuid

from joserfc.jwk import OKPKey

from agent.errors import SignatureInvalid
from agent.protocol.evidence import EvidenceError, ReplyIgnored
from agent.protocol.messages import EvidenceReply, EvidenceRequest, TopicLayout
from agent.protocol.sealing import SealedDataInvalid, unseal
from agent.protocol.signing import MessageSigner, unverified_header, verify_claims

log = logging.getLogger(__name__)


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
    link.publish(topics.topic(site, device, "evidence-request"), signer.sign_model(request).encode())
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
