"""Nobody with access to the broker can silence a device or sneak a wrong alert past the centre.

Each test here is one attack that worked on an earlier version: a crafted token that killed a
thread, claims that were coerced or stored as something else, an acknowledgement for a row
that was never written.
"""

import json
import math
import sqlite3
import time
import uuid

import paho.mqtt.client as paho
import pytest
from joserfc import jws
from joserfc.jwk import OKPKey

from agent.device.agent import Agent
from agent.protocol.messages import TopicLayout, new_claims
from agent.protocol.signing import ALGORITHM, key_id
from hw.gpio import IndicatorState
from tests.conftest import wait_until

TOPICS = TopicLayout("edge")
ALERT_TOPIC = "edge/site-a/cp-1/alert"


def b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_raw(key: OKPKey, payload: bytes, header: dict | None = None) -> bytes:
    """A genuine Ed25519 signature over any bytes: the device key signing whatever an attacker wants checked."""
    protected = {"alg": ALGORITHM, "kid": key_id(key), **(header or {})}
    return jws.serialize_compact(protected, payload, key, algorithms=[ALGORITHM]).encode()


def unsigned_token(header: dict, payload: bytes = b"{}") -> bytes:
    """What anyone on the broker can publish: any header, any payload, a junk signature."""
    return f"{b64url(json.dumps(header).encode())}.{b64url(payload)}.{b64url(b'x' * 64)}".encode()


CRIT_TOKEN = unsigned_token({"alg": "Ed25519", "crit": 5})


def alert_claims(**changes) -> dict:
    return {**new_claims(device="cp-1", site="site-a", seq=1, kind="alert", body={"button": "help"}), **changes}


def claims_bytes(claims: dict) -> bytes:
    return json.dumps(claims, allow_nan=True).encode()


# The receiver's claims are strict: nothing is coerced, nothing non-finite, nothing too big or too deep.


@pytest.mark.parametrize(
    "field,value",
    [
        ("seq", "123"),
        ("seq", 5.0),
        ("seq", True),
        ("seq", 0),
        ("seq", 2**63),
        ("test", "false"),
        ("test", 0),
        ("created", math.nan),
        ("created", math.inf),
        ("sent", math.nan),
        ("event_id", "not-a-uuid"),
        ("kind", "ALERT"),
        ("device", 7),
        ("body", []),
    ],
)
def test_claims_of_the_wrong_type_are_malformed_and_never_stored(checker, device_key, field, value):
    verdict = checker.check(ALERT_TOPIC, sign_raw(device_key, claims_bytes(alert_claims(**{field: value}))))
    assert (verdict.outcome, verdict.reason) == ("rejected", "malformed"), verdict.detail
    assert field in verdict.detail or "JSON" in verdict.detail
    assert checker.store.messages() == []


def test_ten_thousand_levels_of_json_are_refused_before_parsing(checker, device_key):
    claims = claims_bytes(alert_claims(body={}))
    deep = claims.replace(b'"body": {}', b'"body": {"x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}")
    verdict = checker.check(ALERT_TOPIC, sign_raw(device_key, deep))
    assert (verdict.outcome, verdict.reason) == ("rejected", "malformed")
    assert "deeper than" in verdict.detail


def test_an_unknown_critical_header_is_malformed_not_a_crash(checker, device_key):
    assert checker.check(ALERT_TOPIC, CRIT_TOKEN).reason == "malformed"
    header = {"alg": "Ed25519", "kid": key_id(device_key), "crit": ["exp"], "exp": 1}
    signed_with_crit = unsigned_token(header, claims_bytes(alert_claims()))
    assert checker.check(ALERT_TOPIC, signed_with_crit).reason == "malformed"
    assert checker.counters["malformed"] == 2 and checker.guard.errors == {}


def test_a_genuine_alert_after_hostile_ones_is_still_accepted(checker, device_key):
    for payload in (CRIT_TOKEN, b"\xff" * 100, b"a.b.c", b"..", unsigned_token({"alg": "Ed25519", "kid": []})):
        assert checker.check(ALERT_TOPIC, payload).outcome == "rejected"
    assert checker.check(ALERT_TOPIC, sign_raw(device_key, claims_bytes(alert_claims()))).outcome == "accepted"


# The device: a hostile acknowledgement must not stop delivery, even retained and read again at every start.


def publish_retained(broker, topic: str, payload: bytes) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def press(pin):
    pin.drive_low()
    pin.drive_high()
    time.sleep(0.04)


def test_a_retained_poisoned_ack_does_not_silence_the_device(site, broker, receiver, mock_factory):
    config = site.add_device("cp-1", body='[[buttons]]\nname = "help"\npin = 17\n[indicator]\nled_pin = 5\n')
    publish_retained(broker, "edge/demo-site/cp-1/ack", CRIT_TOKEN)
    for _restart in range(2):  # and again after a restart, when the broker hands the retained message over anew
        with Agent(config, pin_factory=mock_factory) as agent:
            assert agent.link.wait_subscribed(10)
            assert wait_until(lambda: agent.delivery.stats.bad_acks.get("malformed", 0) >= 1, 10)
            press(mock_factory.pin(17))
            assert wait_until(lambda: agent.indicator_state() is IndicatorState.ACKNOWLEDGED, 10)
            assert agent.delivery.is_alive and agent.problems() == []
            assert agent.delivery.guard.errors == {}  # handled as a bad ack, not as a surprise
        mock_factory.reset()
    assert len(receiver.store.messages(kind="alert")) == 2


def test_the_receiver_survives_a_crit_token_and_stores_the_next_alert(site, broker, receiver, verdicts, mock_factory):
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish("edge/demo-site/cp-1/alert", CRIT_TOKEN, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    assert wait_until(lambda: receiver.counters["malformed"] >= 1, 10)
    assert receiver.problems() == []
    with Agent(site.add_device("cp-1"), pin_factory=mock_factory) as agent:
        agent.raise_alert("main")
        assert wait_until(lambda: agent.delivery.stats.acknowledged == 1, 10)
    assert len(receiver.store.messages(kind="alert")) == 1


# The centre acknowledges only what it has stored, and exactly that event.


def test_a_store_that_cannot_write_sends_no_ack_until_it_can(site, receiver, verdicts, mock_factory):
    outside = sqlite3.connect(receiver.config.database_path)  # another process breaks the disk, as it were
    outside.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    outside.commit()
    with Agent(site.add_device("cp-1"), pin_factory=mock_factory) as agent:
        entry = agent.raise_alert("main")
        assert wait_until(lambda: receiver.counters["store_failed"] >= 1, 10)
        assert agent.delivery.stats.acknowledged == 0 and [e.seq for e in agent.outbox.entries()] == [entry.seq]
        outside.execute("DROP TRIGGER refuse")
        outside.commit()
        assert wait_until(lambda: agent.delivery.stats.acknowledged == 1, 20)  # the device's resend lands
    (stored,) = receiver.store.messages(kind="alert")
    assert stored.event_id == entry.event_id
    outside.close()


def test_an_ack_names_the_stored_event_not_a_sibling_on_the_same_sequence(checker, device_key):
    first = alert_claims()
    assert checker.check(ALERT_TOPIC, sign_raw(device_key, claims_bytes(first))).outcome == "accepted"
    other = {**first, "event_id": str(uuid.uuid4())}
    verdict = checker.check(ALERT_TOPIC, sign_raw(device_key, claims_bytes(other)))
    assert (verdict.outcome, verdict.reason) == ("rejected", "replayed")
