"""What anyone allowed to read the broker sees: a third client on '#', and every decoding of what it saw."""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Iterator

from agent.demo.site import LocalSite
from agent.mqtt.link import MqttLink


class BrokerSpy:
    """An MQTT client subscribed to ``#`` that keeps every message; it may also publish (replay, forge)."""

    def __init__(self, site: LocalSite, client_id: str = "spy"):
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        config = site.receiver_config
        self.link = MqttLink(config.mqtt, client_id=client_id, secret_dirs=config.secret_dirs, session_expiry_s=0)
        self.link.on_message = self._record
        self.link.subscribe("#")
        self.link.start()
        assert self.link.wait_subscribed(10), "the spy could not subscribe to '#'"

    def __enter__(self) -> BrokerSpy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.link.close()

    def _record(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.messages.append((topic, payload))

    def on(self, channel: str) -> list[bytes]:
        """Payloads seen on topics ending in ``/<channel>``."""
        with self._lock:
            return [payload for topic, payload in self.messages if topic.endswith("/" + channel)]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.link.publish(topic, payload, retain=retain)

    def found(self, secret: bytes) -> list[str]:
        """Topics of messages in which ``secret`` (or a 64-byte slice of it) appears in any decoding."""
        probes = [secret, secret[len(secret) // 2 : len(secret) // 2 + 64]]
        with self._lock:
            seen = list(self.messages)
        return [topic for topic, payload in seen if any(p in r for r in readings(payload) for p in probes)]


def readings(data: bytes, depth: int = 0) -> Iterator[bytes]:
    """The bytes and everything they decode to: JOSE segments, JSON strings, base64 and base64url, recursively."""
    yield data
    if depth >= 4:
        return
    for part in re.split(rb'[.\s"]', data):
        if len(part) >= 16:
            for decoded in (_b64(part, urlsafe=True), _b64(part, urlsafe=False)):
                if decoded is not None:
                    yield from readings(decoded, depth + 1)


def _b64(text: bytes, urlsafe: bool) -> bytes | None:
    try:
        if urlsafe:
            text = text.replace(b"-", b"+").replace(b"_", b"/")
        return base64.b64decode(text.rstrip(b"=") + b"=" * (-len(text.rstrip(b"=")) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
