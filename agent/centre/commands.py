"""Sending one signed command to one device and waiting for its signed answer; every step audited.

The command goes to ``<prefix>/<site>/<device>/command`` (QoS 1, never
retained: a command is for now). The device answers in a signed ``event``
``{"command": {...}}`` that the receiver stores like any event; this side
also listens on the device's event topic (a plain subscription, beside the
receivers' shared one) and takes the answer whose signature verifies with the
device's enrolled key and whose ``command_id`` is this command's. Each command
sent and each answer (or its absence) is appended to ``commands.log`` (JSON
lines) in the receiver's state directory.
"""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path
from typing import Any

from agent.errors import SignatureInvalid, UplinkError
from agent.protocol.commands import sign_command
from agent.protocol.enrolment import EnrolledDevice
from agent.protocol.messages import MessageClaims, TopicLayout
from agent.protocol.signing import MessageSigner, verify_claims

AUDIT = "commands.log"


def audit(state_dir: Path, record: dict[str, Any]) -> None:
    """One JSON line per step, appended and flushed (an audit trail, not a database)."""
    path = Path(state_dir) / AUDIT
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"at": time.time(), **record}, sort_keys=True) + "\n")


def send_command(
    link,
    topics: TopicLayout,
    signer: MessageSigner,
    device: EnrolledDevice,
    command: str,
    *,
    lifetime_s: float,
    timeout_s: float,
    state_dir: Path,
) -> dict[str, Any]:
    """Send a command and return the device's answer body; UplinkError when none came within ``timeout_s``."""
    answers: queue.Queue[bytes] = queue.Queue()
    link.on_message = lambda topic, payload: answers.put(payload)
    link.subscribe(topics.topic(device.site, device.device_id, "event"))
    if not link.wait_subscribed(timeout_s):
        raise UplinkError(f"the broker did not confirm the subscription to {device.device_id}'s event topic")
    token, command_id = sign_command(
        signer, device=device.device_id, site=device.site, command=command, sent=time.time(), lifetime_s=lifetime_s
    )
    link.publish(topics.topic(device.site, device.device_id, "command"), token.encode(), qos=1)
    base = {"device": device.device_id, "site": device.site, "command": command, "command_id": command_id}
    audit(state_dir, {**base, "step": "sent"})
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            payload = answers.get(timeout=left)
        except queue.Empty:
            break
        answer = _answer_in(payload, device, command_id)
        if answer is not None:
            audit(state_dir, {**base, "step": "answered", "answer": answer})
            return answer
    audit(state_dir, {**base, "step": "no answer", "timeout_s": timeout_s})
    raise UplinkError(f"{device.device_id} did not answer command {command} ({command_id}) within {timeout_s:g} s")


def _answer_in(payload: bytes, device: EnrolledDevice, command_id: str) -> dict[str, Any] | None:
    """The answer to this command if ``payload`` is one, signed by the device; anything else is not."""
    try:
        claims = verify_claims(MessageClaims, payload, device.key)
    except SignatureInvalid:
        return None
    body = claims.body.get("command")
    if claims.device != device.device_id or not isinstance(body, dict) or body.get("command_id") != command_id:
        return None
    return body
