"""Arbitrary bytes, arbitrary tokens and arbitrary JSON signed with genuine keys, at every inbound parser.

Whatever arrives, each boundary answers with a verdict or a counted rejection, no exception
escapes, the thread that read it lives on, and a genuine message afterwards still goes through.
"""

import base64
import json
import time

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jws

from agent.centre.keyring import Keyring
from agent.centre.receiver import MessageChecker
from agent.centre.store import ReceiverStore
from agent.config.mqtt import MqttSection
from agent.device.agent import Agent
from agent.device.delivery import Delivery
from agent.device.outbox import Outbox
from agent.mqtt.link import MqttLink
from agent.protocol.enrolment import enrolment_record
from agent.protocol.messages import TopicLayout, new_claims
from agent.protocol.signing import ALGORITHM, MessageSigner, generate_private_key, key_id
from tests.conftest import wait_until

TOPICS = TopicLayout("edge")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
CLAIM_FIELDS = [
    *("v", "device", "site", "seq", "event_id", "created", "sent", "kind", "test", "body", "receiver"),
    *("centre", "id"),
]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_raw(key, payload: bytes, header: dict | None = None) -> bytes:
    protected = {"alg": ALGORITHM, "kid": key_id(key), **(header or {})}
    return jws.serialize_compact(protected, payload, key, algorithms=[ALGORITHM]).encode()


def hostile_payloads(key, genuine: dict):
    """Everything a broker user can send, from noise to well-signed nonsense."""
    raw = st.binary(max_size=600)
    segments = st.tuples(st.binary(max_size=80), st.binary(max_size=200), st.binary(max_size=80)).map(
        lambda parts: ".".join(b64url(p) for p in parts).encode()
    )
    headers = st.dictionaries(st.sampled_from(["alg", "kid", "crit", "typ", "b64", "zip", "x"]), json_values).map(
        lambda header: f"{b64url(json.dumps(header).encode())}.{b64url(b'{}')}.{b64url(b'0' * 64)}".encode()
    )
    signed_json = json_values.map(lambda value: sign_raw(key, json.dumps(value).encode()))
    mutated = st.tuples(st.sampled_from(CLAIM_FIELDS), json_values).map(
        lambda change: sign_raw(key, json.dumps({**genuine, change[0]: change[1]}).encode())
    )
    dropped = st.sampled_from(CLAIM_FIELDS).map(
        lambda field: sign_raw(key, json.dumps({k: v for k, v in genuine.items() if k != field}).encode())
    )
    return raw | segments | headers | signed_json | mutated | dropped


# The centre: one checker for alert, event, telemetry and status topics.


@pytest.fixture(scope="module")
def device_key(tmp_path_factory):
    return generate_private_key(tmp_path_factory.mktemp("fuzz-device") / "device.pem")


@pytest.fixture(scope="module")
def checker(tmp_path_factory, device_key):
    where = tmp_path_factory.mktemp("fuzz-centre")
    keyring = Keyring(where / "keyring")
    keyring.enroll(enrolment_record("cp-1", "site-a", "call-point", device_key))
    with ReceiverStore(where / "r.sqlite") as store:
        yield MessageChecker(keyring, store, TOPICS)


GENUINE_ALERT = new_claims(device="cp-1", site="site-a", seq=1, kind="alert", body={"button": "help"})


@FUZZ
@given(data=st.data(), channel=st.sampled_from(["alert", "event", "telemetry", "status"]))
def test_the_receiver_judges_anything_without_raising(checker, device_key, data, channel):
    payload = data.draw(hostile_payloads(device_key, GENUINE_ALERT))
    verdict = checker.check(f"edge/site-a/cp-1/{channel}", payload)
    assert verdict.outcome in ("accepted", "duplicate", "rejected", "ignored")
    assert verdict.reason != "internal_error", verdict.detail
    assert checker.guard.errors == {}


def test_after_the_fuzzing_a_genuine_alert_is_accepted(checker, device_key):
    claims = {**GENUINE_ALERT, "seq": 10**6, "event_id": "00000000-0000-4000-8000-000000000001", "sent": time.time()}
    assert checker.check("edge/site-a/cp-1/alert", sign_raw(device_key, json.dumps(claims).encode())).outcome in (
        "accepted",
        "duplicate",
    )


# The device: acknowledgements (the centre's key signs, but anyone can publish on the ack topic).


@pytest.fixture(scope="module")
def centre_key(tmp_path_factory):
    return generate_private_key(tmp_path_factory.mktemp("fuzz-centre-key") / "centre.pem")


@pytest.fixture(scope="module")
def delivery(tmp_path_factory, centre_key):
    """A courier whose link never connects: hostile acks enter where paho hands them over."""
    where = tmp_path_factory.mktemp("fuzz-device-side")
    device_key = generate_private_key(where / "device.pem")
    link = MqttLink(MqttSection(host="127.0.0.1", port=1, tls={"enabled": False}), "fuzz", ())
    with Outbox(where / "outbox.sqlite") as outbox:
        courier = Delivery(outbox, link, MessageSigner(device_key), TOPICS, centre_key, device="cp-1", ack_retry_s=60)
        courier.start()
        yield courier
        courier.stop()


GENUINE_ACK = {
    "v": 1,
    "kind": "ack",
    "receiver": "centre-1",
    "device": "cp-1",
    "seq": 1,
    "event_id": GENUINE_ALERT["event_id"],
    "stored_at": 1.7e9,
    "sent": 1.7e9,
    "duplicate": False,
}


def handled_acks(delivery) -> int:
    stats = delivery.stats
    return sum(stats.bad_acks.values()) + stats.acknowledged + stats.unmatched_acks


@FUZZ
@given(data=st.data())
def test_delivery_survives_any_acknowledgement(delivery, centre_key, data):
    payload = data.draw(hostile_payloads(centre_key, GENUINE_ACK))
    seen = handled_acks(delivery)
    delivery.handle_ack(payload)
    assert wait_until(lambda: handled_acks(delivery) > seen, 5)
    assert delivery.is_alive and delivery.guard.errors == {}


def test_after_the_fuzzing_a_genuine_ack_retires_its_alert(delivery, centre_key):
    entry = delivery.outbox.add(
        "alert", True, lambda seq: new_claims(device="cp-1", site="site-a", seq=seq, kind="alert", body={})
    )
    ack = {**GENUINE_ACK, "seq": entry.seq, "event_id": entry.event_id}
    delivery.handle_ack(MessageSigner(centre_key).sign(ack).encode())
    assert wait_until(lambda: delivery.outbox.entries() == [], 5)


# The device: "help is coming" arrives on the same ack topic; the router and its check never raise.

GENUINE_RESPONDING = {
    "v": 1,
    "kind": "responding",
    "centre": "centre-1",
    "device": "cp-1",
    "seq": 1,
    "event_id": GENUINE_ALERT["event_id"],
    "id": "00000000-0000-4000-8000-000000000004",
    "sent": 1.7e9,
}


@pytest.fixture(scope="module")
def help_coming(centre_key):
    from agent.device.clock import CentreClock
    from agent.device.response import HelpComing

    watch = HelpComing("cp-1", centre_key, clock=CentreClock(), hold_s=60)
    watch.expect(1, GENUINE_ALERT["event_id"], silent=False)
    return watch


@FUZZ
@given(data=st.data())
def test_help_is_coming_refuses_anything_hostile_with_a_reason(help_coming, centre_key, data):
    from agent.device.response import names_responding

    payload = data.draw(hostile_payloads(centre_key, GENUINE_RESPONDING) | hostile_payloads(centre_key, GENUINE_ACK))
    assert names_responding(payload) in (True, False)  # the router never raises; the check refuses it either way
    refused = sum(help_coming.refused.values())
    assert help_coming.handle(payload) is False
    assert sum(help_coming.refused.values()) == refused + 1
    assert set(help_coming.refused) <= {
        *("malformed", "bad_signature", "algorithm_not_allowed"),
        *("wrong_device", "stale", "unknown_alert", "silent", "replayed"),
    }


def test_after_the_fuzzing_a_genuine_responding_message_is_shown(help_coming, centre_key):
    genuine = {**GENUINE_RESPONDING, "id": "00000000-0000-4000-8000-000000000005", "sent": time.time()}
    assert help_coming.handle(MessageSigner(centre_key).sign(genuine).encode()) is True
    assert help_coming.showing


# End to end: a burst of hostile messages on every inbound topic of both sides, then a real press.

BURST = settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))


@BURST
@given(data=st.data())
def test_a_live_site_shrugs_off_a_hostile_burst(site_with_agent, data):
    site, broker, receiver, agent = site_with_agent
    device_key = agent.signer._key
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    prefix = f"edge/{site.site}/{agent.device}"
    genuine = new_claims(device=agent.device, site=site.site, seq=1, kind="alert", body={})
    for channel in ("alert", "event", "telemetry", "status", "ack"):
        for payload in data.draw(st.lists(hostile_payloads(device_key, genuine), min_size=5, max_size=10)):
            client.publish(f"{prefix}/{channel}", payload, qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    acknowledged = agent.delivery.stats.acknowledged
    agent.raise_alert("main")
    assert wait_until(lambda: agent.delivery.stats.acknowledged > acknowledged, 15)
    assert receiver.problems() == [] and agent.problems() == []
    assert receiver.checker.guard.errors == {} and agent.delivery.guard.errors == {}


@pytest.fixture(scope="module")
def site_with_agent(tmp_path_factory):
    from gpiozero.pins.mock import MockFactory

    from agent.centre.receiver import Receiver
    from agent.demo.broker import LocalBroker
    from agent.demo.site import LocalSite

    where = tmp_path_factory.mktemp("fuzz-site")
    with LocalBroker(workdir=where / "mosquitto") as broker:
        site = LocalSite(where / "site", broker)
        config = site.add_device("cp-fuzz")
        with Receiver(site.receiver_config) as receiver, Agent(config, pin_factory=MockFactory()) as agent:
            assert receiver.link.wait_subscribed(10) and agent.link.wait_subscribed(10)
            yield site, broker, receiver, agent


# Evidence: requests at the camera box, replies at the centre.

GENUINE_REQUEST = {
    "v": 1,
    "kind": "evidence-request",
    "device": "cam-1",
    "ref": "evidence/00000000-0000-4000-8000-000000000002.jpg",
    "request_id": "00000000-0000-4000-8000-000000000003",
    "sent": 1.7e9,
}
GENUINE_REPLY = {
    "v": 1,
    "kind": "evidence",
    "device": "cam-1",
    "ref": GENUINE_REQUEST["ref"],
    "request_id": GENUINE_REQUEST["request_id"],
    "sent": 1.7e9,
    "sha256": "0" * 64,
    "jpeg_jwe": "a.b.c.d.e",
}


@pytest.fixture(scope="module")
def evidence_server(tmp_path_factory, centre_key):
    from agent.device.evidence_server import EvidenceServer
    from agent.protocol.sealing import CentreKeys, generate_encryption_key

    where = tmp_path_factory.mktemp("fuzz-evidence")
    link = MqttLink(MqttSection(host="127.0.0.1", port=1, tls={"enabled": False}), "fuzz-cam", ())
    keys = CentreKeys(centre_key, generate_encryption_key(where / "enc.pem"), "fuzz")
    signer = MessageSigner(generate_private_key(where / "cam.pem"))
    server = EvidenceServer(
        link,
        TOPICS,
        site="site-a",
        device="cam-1",
        signer=signer,
        centre_keys=keys,
        evidence_dir=where,
        state_dir=where,
    )
    yield server
    server.close()


@FUZZ
@given(data=st.data())
def test_the_camera_refuses_any_hostile_evidence_request_with_a_reason(evidence_server, centre_key, data):
    from agent.protocol.evidence import RequestRefused

    payload = data.draw(hostile_payloads(centre_key, GENUINE_REQUEST))
    try:
        evidence_server.answer(payload)
    except RequestRefused as refused:
        assert refused.reason in (
            "malformed",
            "bad_signature",
            "algorithm_not_allowed",
            "wrong_device",
            "stale",
            "replayed",
        )


@pytest.fixture(scope="module")
def fetcher_side(tmp_path_factory):
    """What the centre holds while fetching: the keyring with the camera enrolled, and its decryption key."""
    from agent.protocol.sealing import generate_encryption_key

    where = tmp_path_factory.mktemp("fuzz-reply")
    camera_key = generate_private_key(where / "cam.pem")
    keyring = Keyring(where / "keyring")
    keyring.enroll(enrolment_record("cam-1", "site-a", "camera-box", camera_key))
    return camera_key, keyring, generate_encryption_key(where / "enc.pem")


@FUZZ
@given(data=st.data())
def test_the_centre_ignores_or_refuses_any_hostile_evidence_reply(fetcher_side, data):
    from agent.centre.evidence_fetch import open_reply
    from agent.protocol.evidence import EvidenceError

    camera_key, keyring, decryption_key = fetcher_side
    payload = data.draw(hostile_payloads(camera_key, GENUINE_REPLY))
    with pytest.raises(EvidenceError):  # ReplyIgnored is one (not our reply); any other: the reply failed
        open_reply(
            payload,
            keyring=keyring,
            decryption_key=decryption_key,
            device="cam-1",
            ref=GENUINE_REQUEST["ref"],
            request_id=GENUINE_REQUEST["request_id"],
            expected_sha256="0" * 64,
        )
