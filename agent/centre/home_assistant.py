"""A plain feed of verified events for home automation, with Home Assistant MQTT discovery.

For each device: an event entity for its alerts (``alert``, ``test``, ``detection``), a connectivity
binary sensor (online/offline from its status and the receiver's missing/back events) and its tamper
switch as a problem sensor. Discovery configs and states are retained, so Home Assistant finds them
whenever it subscribes; events are not. Payloads are plain JSON made from the verified claims, never
the signed originals (which would hand a home-automation system material it has no business with).
Silent alerts (duress) are left out unless ``include_silent``: a silent alarm must not light up a panel
an attacker can see. The feed is state for convenience, not an alarm path: it is not durable (what
paho holds while the broker is away is lost with the process); alarms go to ARCs over DC-09.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
from typing import TYPE_CHECKING, Any

from agent.errors import UplinkError
from agent.mqtt.link import MqttLink, Will

if TYPE_CHECKING:
    from agent.centre.keyring import Keyring
    from agent.centre.registry import DeviceEvent, DeviceRegistry
    from agent.config.centre import ReceiverConfig
    from agent.protocol.messages import MessageClaims

log = logging.getLogger(__name__)

EVENT_TYPES = ["alert", "test", "detection"]


def object_id(site: str, device: str) -> str:
    """Site and device as a discovery object id (Home Assistant allows ``[a-zA-Z0-9_-]``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{site}_{device}")


class HomeAssistantFeed:
    """Republishes what the receiver verified, as Home Assistant expects it; attach as its callbacks."""

    def __init__(self, config: ReceiverConfig, keyring: Keyring, registry: DeviceRegistry):
        self.settings = config.forward.home_assistant
        self.keyring = keyring
        self.registry = registry
        self.prefix = self.settings.topic_prefix
        self.availability = f"{self.prefix}/status"
        self._announced: set[tuple[str, str]] = set()
        self.failures = 0
        self.retained: dict[str, bytes] = {}  # the last retained payload published on each topic
        self.announced = threading.Event()  # discovery for the enrolled devices has been sent (once connected)
        self._lock = threading.Lock()
        self._unacked: set[int] = set()  # publishes the broker has not confirmed yet
        self._early: set[int] = set()  # confirmations that beat publish() returning its mid
        self.link = MqttLink(
            config.mqtt.model_copy(update={"fallback": []}),
            client_id=f"receiver-{config.receiver.id}-home-assistant",
            secret_dirs=config.secret_dirs,
            will=Will(self.availability, b"offline", retain=True),
            session_expiry_s=0,
        )
        # On paho's thread: only start the work (it reads the registry) elsewhere.
        self.link.on_published = self._confirmed
        self.link.on_connected = lambda session_present: threading.Thread(
            target=self._announce_all, name="home-assistant-announce", daemon=True
        ).start()

    def start(self) -> None:
        self.link.start()

    def close(self) -> None:
        self.link.close(final=(self.availability, b"offline"))

    def verdict(self, verdict: Any) -> None:
        """The receiver's ``on_verdict``: accepted alerts, tamper and status become events and states."""
        claims = verdict.claims
        if verdict.outcome != "accepted" or claims is None:
            return
        self._announce(claims.site, claims.device, None)
        base = self._topic(claims.site, claims.device)
        if claims.kind in ("alert", "test"):
            event = alert_event(claims, self.settings.include_silent)
            if event is not None:
                self._publish(f"{base}/alert", event)
        elif claims.kind == "tamper" and claims.body.get("enclosure") in ("opened", "closed"):
            self._publish(f"{base}/tamper", "ON" if claims.body["enclosure"] == "opened" else "OFF", retain=True)
        elif claims.kind == "status" and claims.body.get("state") in ("online", "offline"):
            self._publish(f"{base}/connectivity", "ON" if claims.body["state"] == "online" else "OFF", retain=True)

    def device_event(self, event: DeviceEvent) -> None:
        """The receiver's ``on_device_event``: missing is offline, back is online."""
        self._announce(event.site, event.device, None)
        state = "OFF" if event.event == "missing" else "ON"
        self._publish(f"{self._topic(event.site, event.device)}/connectivity", state, retain=True)

    def _announce_all(self) -> None:
        """On every (re)connect: discovery for every enrolled device, and what the registry knows of each."""
        try:
            self._announce_enrolled()
        except (OSError, sqlite3.Error) as exc:  # the database is busy or gone: the next connect tries again
            log.warning("home automation feed: cannot read the fleet: %s", exc)
        self.announced.set()

    def _announce_enrolled(self) -> None:
        self._publish(self.availability, "online", retain=True)
        self._announced.clear()
        states = {s.device: s for s in self.registry.states()}
        for device in self.keyring.devices():
            self._announce(device.site, device.device_id, device.kind)
            state = states.get(device.device_id)
            if state is not None and state.last_seen is not None:
                online = not state.missing and state.status != "offline"
                self._publish(
                    f"{self._topic(device.site, device.device_id)}/connectivity", "ON" if online else "OFF", retain=True
                )

    def _announce(self, site: str, device: str, kind: str | None) -> None:
        if (site, device) in self._announced:
            return
        self._announced.add((site, device))
        for component, name, config in self.discovery(site, device, kind):
            self._publish(f"{self.settings.discovery_prefix}/{component}/edge_agent/{name}/config", config, retain=True)

    def discovery(self, site: str, device: str, kind: str | None) -> list[tuple[str, str, dict]]:
        """(component, object id, config) of the three entities of one device."""
        oid, base = object_id(site, device), self._topic(site, device)
        common = {
            "availability_topic": self.availability,
            "device": {
                "identifiers": [f"edge_agent_{oid}"],
                "name": f"{site} {device}",
                "manufacturer": "edge-agent",
                "model": kind or "device",
            },
            "origin": {"name": "edge-agent"},
        }
        return [
            (
                "event",
                f"{oid}_alert",
                {
                    **common,
                    "name": "Alert",
                    "unique_id": f"{oid}_alert",
                    "state_topic": f"{base}/alert",
                    "event_types": EVENT_TYPES,
                    "device_class": "button",
                },
            ),
            (
                "binary_sensor",
                f"{oid}_connectivity",
                {
                    **common,
                    "name": "Connectivity",
                    "unique_id": f"{oid}_connectivity",
                    "state_topic": f"{base}/connectivity",
                    "device_class": "connectivity",
                },
            ),
            (
                "binary_sensor",
                f"{oid}_tamper",
                {
                    **common,
                    "name": "Tamper",
                    "unique_id": f"{oid}_tamper",
                    "state_topic": f"{base}/tamper",
                    "device_class": "problem",
                },
            ),
        ]

    def _topic(self, site: str, device: str) -> str:
        return f"{self.prefix}/{object_id(site, device)}"

    def _publish(self, topic: str, payload: dict | str, retain: bool = False) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload, sort_keys=True).encode()
        try:
            mid = self.link.publish(topic, data, qos=1, retain=retain)
        except UplinkError as exc:
            self.failures += 1
            log.warning("home automation feed: %s", exc)
            return
        with self._lock:
            if retain:
                self.retained[topic] = data
            if mid in self._early:
                self._early.discard(mid)
            else:
                self._unacked.add(mid)

    def _confirmed(self, mid: int, ok: bool, reason: str) -> None:
        """paho's thread: the broker took (or refused) a publish."""
        with self._lock:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                self._early.add(mid)
        if not ok:
            self.failures += 1

    def settled(self) -> bool:
        """True when the broker has confirmed everything published so far (retained ones are then on it)."""
        with self._lock:
            return not self._unacked


def alert_event(claims: MessageClaims, include_silent: bool) -> dict | None:
    """The event entity's payload for an alert (``event_type`` plus plain attributes), or None if left out."""
    body = claims.body
    if body.get("silent") is True and not include_silent:
        return None
    if claims.test or claims.kind == "test":
        event_type = "test"
    elif body.get("source") == "camera":
        event_type = "detection"
    else:
        event_type = "alert"
    attributes = {key: body[key] for key in ("button", "alert_kind", "location", "rule", "zone") if key in body}
    return {"event_type": event_type, **attributes, "seq": claims.seq, "created": claims.created}


def attach_feed(receiver: Any) -> HomeAssistantFeed | None:
    """The feed, hooked to a receiver's callbacks, when ``[forward.home_assistant] enabled``; else None."""
    if not receiver.config.forward.home_assistant.enabled:
        return None
    feed = HomeAssistantFeed(receiver.config, receiver.keyring, receiver.registry)
    receiver.on_verdict = _both(receiver.on_verdict, feed.verdict)
    receiver.on_device_event = _both(receiver.on_device_event, feed.device_event)
    return feed


def _both(first: Any, second: Any) -> Any:
    if first is None:
        return second
    return lambda item: (first(item), second(item))
