"""What the centre knows about order and time: outstanding alerts are named, a wrong clock delays nothing."""

import json
import threading
import time

import paho.mqtt.client as paho
import pytest

from agent.centre.receiver import Receiver
from agent.cli import main
from agent.device.agent import Agent
from agent.protocol.messages import new_claims
from agent.protocol.signing import MessageSigner, load_private_key
from tests.conftest import wait_until


class DevicePublisher:
    """Signs with a device's real key and publishes exactly the messages a test wants the centre to see."""

    def __init__(self, broker, config):
        self.config = config
        self.signer = MessageSigner(load_private_key(config.secret_dirs[0] / config.identity.private_key_file))
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def alert(self, seq: int, prev: int) -> dict:
        device, site = self.config.device.id, self.config.device.site
        return {**new_claims(device=device, site=site, seq=seq, kind="alert", body={"button": "help"}), "prev": prev}

    def publish(self, claims: dict) -> None:
        topic = f"edge/{claims['site']}/{claims['device']}/alert"
        self.client.publish(topic, self.signer.sign(claims).encode(), qos=1).wait_for_publish(5)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(site, broker):
    sender = DevicePublisher(broker, site.add_device("cp-chain"))
    yield sender
    sender.close()


def outstanding_of(device: str, capsys, site) -> str:
    assert main(["receiver", "devices", "--config", str(site.receiver_toml_path()), "--json"]) == 0
    (row,) = [r for r in json.loads(capsys.readouterr().out) if r["device"] == device]
    return row["outstanding"]


def test_an_alert_that_names_a_missing_predecessor_makes_it_outstanding_until_it_arrives(
    site, receiver, publisher, capsys
):
    first, second, third = (publisher.alert(seq, prev=seq - 1) for seq in (1, 2, 3))
    publisher.publish(first)
    publisher.publish(third)  # seq 2 was sent before seq 3 and has not arrived (yet)
    assert wait_until(lambda: [(d, seq) for d, seq, _ in receiver.store.outstanding()] == [("cp-chain", 2)])
    assert outstanding_of("cp-chain", capsys, site) == "2"
    publisher.publish(second)
    assert wait_until(lambda: receiver.store.outstanding() == [])
    assert outstanding_of("cp-chain", capsys, site) == "-"
    assert [m.seq for m in receiver.store.messages(kind="alert")] == [1, 2, 3]  # shown in creation order


def test_the_device_chains_every_acknowledged_message_but_not_telemetry(site, receiver, mock_factory):
    with Agent(site.add_device("cp-seq"), pin_factory=mock_factory) as agent:
        first = agent.raise_alert("main")
        agent.raise_event("telemetry", {"beat": 1})
        tamper = agent.raise_event("tamper", {"enclosure": "opened"})
        second = agent.raise_alert("main")
        assert wait_until(lambda: agent.delivery.stats.acknowledged == 3, 10)
    assert (first.claims["prev"], tamper.claims["prev"], second.claims["prev"]) == (0, first.seq, tamper.seq)
    assert receiver.store.outstanding() == []


def test_an_alert_from_a_device_five_minutes_behind_is_raised_within_5_s_and_flagged(site, verdicts, mock_factory):
    centre_clock = lambda: time.time() + 300  # noqa: E731 - the device's clock is 5 minutes behind the centre's
    with Receiver(site.receiver_config, on_verdict=verdicts, clock=centre_clock) as receiver:
        assert receiver.link.wait_subscribed(10)
        with Agent(site.add_device("cp-late"), pin_factory=mock_factory) as agent:
            assert agent.link.wait_subscribed(10)
            pressed = time.monotonic()
            entry = agent.raise_alert("main")
            assert wait_until(lambda: verdicts.accepted("alert"), 5)
            raised_after = time.monotonic() - pressed
            assert wait_until(lambda: agent.delivery.stats.acknowledged == 1, 5)
            assert agent.health()["clock_error_s"] == pytest.approx(-300, abs=3)
        (stored,) = receiver.store.messages(kind="alert")
        assert stored.event_id == entry.event_id and stored.claims["clock_error_s"] == pytest.approx(-300, abs=3)
        (state,) = [s for s in receiver.registry.states() if s.device == "cp-late"]
        assert state.clock_skew_s == pytest.approx(-300, abs=3)
        assert receiver.counters["stale"] >= 1  # refused once, with the centre's time, then sent again corrected
    assert raised_after < 5


def test_a_nak_or_ack_replayed_later_does_not_move_the_devices_clock(site, broker, receiver, mock_factory):
    answers: list[bytes] = []
    subscribed = threading.Event()
    spy = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    spy.on_message = lambda c, u, m: answers.append(m.payload)
    spy.on_subscribe = lambda *args: subscribed.set()
    spy.connect(broker.host, broker.port)
    spy.loop_start()
    spy.subscribe("edge/demo-site/cp-clock/ack", qos=1)
    assert subscribed.wait(10)
    with Agent(site.add_device("cp-clock"), pin_factory=mock_factory) as agent:
        agent.raise_alert("main")
        assert wait_until(lambda: agent.delivery.stats.acknowledged == 1 and answers, 10)
        time.sleep(3)  # the captured ack is now 3 s old: replayed, it would claim the clock is 3 s behind
        spy.publish("edge/demo-site/cp-clock/ack", answers[0], qos=1).wait_for_publish(5)
        assert wait_until(lambda: agent.delivery.stats.unmatched_acks >= 1, 10)
        assert agent.clock.offset_s == 0.0
    spy.disconnect()
    spy.loop_stop()
