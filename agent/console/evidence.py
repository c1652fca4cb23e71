"""Evidence on the alert page: asked for by an operator, fetched signed, checked, decrypted here, shown once.

The same path as ``edge-agent receiver fetch-evidence``: a signed request to the device over MQTT, a
signed reply sealed for the centre's encryption key, checked against the sha256 in the signed alert.
Each fetch has its own short-lived MQTT connection (replies for one request never reach another), the
image is never written to disk, and the page that shows it is sent ``no-store``.
"""

from __future__ import annotations

import secrets

from agent.centre.evidence_fetch import fetch
from agent.centre.keyring import Keyring
from agent.config.centre import ReceiverConfig
from agent.config.secrets import secret_file
from agent.console.state import AlertView
from agent.mqtt.link import MqttLink
from agent.protocol.evidence import EvidenceError
from agent.protocol.messages import TopicLayout
from agent.protocol.sealing import load_encryption_key
from agent.protocol.signing import MessageSigner, load_private_key

TIMEOUT_S = 15.0


class EvidenceViewer:
    """Fetches an alert's evidence image for the console, with the centre's keys."""

    def __init__(self, config: ReceiverConfig, keyring: Keyring):
        self.config = config
        self.keyring = keyring
        dirs, settings = config.secret_dirs, config.receiver
        self.signer = MessageSigner(load_private_key(secret_file(settings.signing_key_file, dirs, "signing_key_file")))
        self.decryption_key = load_encryption_key(
            secret_file(settings.encryption_key_file, dirs, "receiver.encryption_key_file")
        )

    def image(self, alert: AlertView, timeout_s: float = TIMEOUT_S) -> bytes:
        """The JPEG, checked against the alert's sha256; EvidenceError saying why not."""
        evidence = alert.body.get("evidence")
        if not isinstance(evidence, dict) or not isinstance(evidence.get("ref"), str):
            raise EvidenceError("this alert has no evidence image")
        sha256 = evidence.get("sha256")
        if not isinstance(sha256, str):
            raise EvidenceError("the alert names an image without its sha256: it cannot be checked")
        link = MqttLink(
            self.config.mqtt,
            client_id=f"console-{self.config.receiver.id}-evidence-{secrets.token_hex(4)}",
            secret_dirs=self.config.secret_dirs,
            session_expiry_s=0,
        )
        link.start()
        try:
            if not link.wait_connected(min(timeout_s, 10.0)):
                raise EvidenceError("the console cannot reach the broker")
            return fetch(
                link,
                TopicLayout(self.config.mqtt.topic_prefix),
                self.signer,
                self.keyring,
                self.decryption_key,
                site=alert.site,
                device=alert.device,
                ref=evidence["ref"],
                expected_sha256=sha256,
                timeout_s=timeout_s,
            )
        finally:
            link.close()
