"""The home-automation feed on a real mosquitto, read as Home Assistant reads it: discovery first, then states."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as paho
import pytest

from agent.centre.home_assistant import attach_feed
from agent.centre.receiver import Receiver
from agent.config.centre import load_receiver_config
from agent.device.agent import Agent
from tests.conftest import wait_until

BUTTONS = (
    '[[buttons]]\nname = "help"\npin = 17\nlocation = "Gate"\n\n'
    '[[buttons]]\nname = "duress"\npin = 27\nalert_kind = "duress"\nsilent = true\n\n'
    "[indicator]\nled_pin = 5\n"
)


class HomeAssistantListener:
    """A plain MQTT 3.1.1 client subscribed to discovery and the feed, keeping (topic, payload, retained)."""

    def __init__(self, broker):
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id="home-assistant")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([("homeassistant/#", 1), ("edge-feed/#", 1)])
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._record
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def _record(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def on(self, topic: str) -> list[tuple[bytes, bool]]:
        with self._lock:
            return [(payload, retained) for t, payload, retained in self.messages if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def feeding_receiver(site, verdicts):
    yield from start_feeding_receiver(site, verdicts)


def start_feeding_receiver(site, verdicts):
    path = site.receiver_toml_path()
    path.write_text(path.read_text() + "\n[forward.home_assistant]\nenabled = true\n")
    with Receiver(load_receiver_config(path), on_verdict=verdicts) as running:
        feed = attach_feed(running)
        feed.start()
        assert running.link.wait_subscribed(10) and feed.link.wait_connected(10)
        yield running, feed
        feed.close()


def test_home_assistant_finds_retained_discovery_and_gets_plain_events(site, feeding_receiver, broker, mock_factory):
    receiver, feed = feeding_receiver
    config = site.add_device("cp-1", body=BUTTONS)
    with Agent(config, pin_factory=mock_factory) as agent:
        assert agent.link.wait_connected(10)
        agent.raise_alert("help")
        agent.raise_alert("duress")  # silent: never shown to home automation
        agent.raise_alert("help", test=True)
        agent.raise_event("tamper", {"enclosure": "opened"})
        assert wait_until(lambda: len(receiver.store.messages(kind="alert")) == 3, 10)
        assert wait_until(lambda: receiver.store.messages(kind="tamper"), 10)
        assert wait_until(lambda: len(receiver.store.messages(kind="status")) >= 1, 10)
        oid = f"{site.site}_cp-1".replace(".", "_")
        states = (f"edge-feed/{oid}/tamper", f"edge-feed/{oid}/connectivity")
        assert wait_until(lambda: all(t in feed.retained for t in states) and feed.settled(), 10)
        listener = HomeAssistantListener(broker)  # Home Assistant starts now: all it has is what was retained
        try:
            assert wait_until(lambda: listener.on(f"homeassistant/event/edge_agent/{oid}_alert/config"), 10)
            (event_config, retained), *_ = listener.on(f"homeassistant/event/edge_agent/{oid}_alert/config")
            event_config = json.loads(event_config)
            assert retained and event_config["event_types"] == ["alert", "test", "detection"]
            assert event_config["state_topic"] == f"edge-feed/{oid}/alert"
            assert event_config["availability_topic"] == "edge-feed/status"
            for name, device_class in (("connectivity", "connectivity"), ("tamper", "problem")):
                assert wait_until(
                    lambda n=name: listener.on(f"homeassistant/binary_sensor/edge_agent/{oid}_{n}/config"), 5
                )
                ((config_json, retained),) = listener.on(f"homeassistant/binary_sensor/edge_agent/{oid}_{name}/config")
                sensor = json.loads(config_json)
                assert retained and sensor["device_class"] == device_class
                assert sensor["device"]["identifiers"] == event_config["device"]["identifiers"]
            assert wait_until(lambda: listener.on(f"edge-feed/{oid}/tamper") == [(b"ON", True)], 5)
            assert wait_until(lambda: listener.on(f"edge-feed/{oid}/connectivity") == [(b"ON", True)], 5)
            assert listener.on("edge-feed/status") == [(b"online", True)]
            assert listener.on(f"edge-feed/{oid}/alert") == []  # events are not retained
            agent.raise_alert("help")  # now Home Assistant is listening
            assert wait_until(lambda: listener.on(f"edge-feed/{oid}/alert"), 10)
        finally:
            listener.close()
    ((payload, retained),) = listener.on(f"edge-feed/{oid}/alert")
    event = json.loads(payload)
    assert not retained and event["event_type"] == "alert" and event["button"] == "help"
    assert event["location"] == "Gate" and set(event) == {
        "event_type",
        "button",
        "alert_kind",
        "location",
        "seq",
        "created",
    }
    everything = b"".join(p for _, p, _ in listener.messages)
    assert b"eyJ" not in everything  # no JWS (base64url JSON) anywhere: never the signed originals


def test_enrolled_devices_are_announced_before_they_say_anything(site, verdicts, broker):
    site.add_device("cp-9", body=BUTTONS)  # enrolled, never heard from
    started = start_feeding_receiver(site, verdicts)
    _, feed = next(started)
    assert feed.announced.wait(10) and wait_until(feed.settled, 10)
    listener = HomeAssistantListener(broker)
    try:
        oid = f"{site.site}_cp-9".replace(".", "_")
        assert wait_until(lambda: listener.on(f"homeassistant/binary_sensor/edge_agent/{oid}_connectivity/config"), 10)
        ((payload, retained),) = listener.on(f"homeassistant/binary_sensor/edge_agent/{oid}_connectivity/config")
        assert retained and json.loads(payload)["device"]["model"] == "call-point"
        assert listener.on(f"edge-feed/{oid}/connectivity") == []  # never seen: no state claimed
    finally:
        listener.close()
        next(started, None)
