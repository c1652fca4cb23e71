"""The receiver rejects every kind of bad message with its reason, and never stores an alert twice."""

import base64
import json
import time

import pytest
from joserfc import jws
from joserfc.jwk import OctKey

from agent.protocol.messages import TopicLayout, new_claims
from agent.protocol.signing import MessageSigner, generate_private_key, key_id

TOPICS = TopicLayout("edge")
ALERT_TOPIC = "edge/site-a/cp-1/alert"


def alert(seq=1, device="cp-1", site="site-a", **changes):
    claims = new_claims(device=device, site=site, seq=seq, kind="alert", body={"button": "help"})
    return {**claims, **changes}


def signed(key, claims) -> bytes:
    return MessageSigner(key).sign(claims).encode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_genuine_alert_is_accepted_and_stored(checker, device_key):
    verdict = checker.check(ALERT_TOPIC, signed(device_key, alert()))
    assert verdict.outcome == "accepted" and verdict.claims.seq == 1
    assert [m.seq for m in checker.store.messages(kind="alert")] == [1]


def test_redelivery_is_a_duplicate_not_a_second_alert(checker, device_key):
    claims = alert()
    assert checker.check(ALERT_TOPIC, signed(device_key, claims)).outcome == "accepted"
    resent = {**claims, "sent": time.time()}  # the device re-signs each copy
    assert checker.check(ALERT_TOPIC, signed(device_key, resent)).outcome == "duplicate"
    assert len(checker.store.messages(kind="alert")) == 1
    assert checker.counters == {"accepted": 1, "duplicate": 1}


def test_forged_signature_is_rejected(checker, device_key, tmp_path):
    attacker = generate_private_key(tmp_path / "attacker.pem")
    token = signed(attacker, alert()).decode().split(".")
    header = b64(json.dumps({"alg": "Ed25519", "kid": key_id(device_key)}).encode())
    verdict = checker.check(ALERT_TOPIC, ".".join([header, token[1], token[2]]).encode())
    assert (verdict.outcome, verdict.reason) == ("rejected", "bad_signature")


def test_altered_payload_is_rejected(checker, device_key):
    header, payload, signature = signed(device_key, alert()).decode().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["body"]["button"] = "other"
    altered = ".".join([header, b64(json.dumps(claims).encode()), signature]).encode()
    assert checker.check(ALERT_TOPIC, altered).reason == "bad_signature"
    assert checker.store.messages() == []


def test_sequence_reused_for_another_event_is_a_replay(checker, device_key):
    checker.check(ALERT_TOPIC, signed(device_key, alert(seq=7)))
    verdict = checker.check(ALERT_TOPIC, signed(device_key, alert(seq=7)))  # same seq, new event id
    assert verdict.reason == "replayed"
    assert "sequence 7 of cp-1 was already used by event" in verdict.detail


def test_captured_message_replayed_later_is_stale(checker, device_key):
    token = signed(device_key, alert())
    checker.clock = lambda: time.time() + 41
    assert checker.check(ALERT_TOPIC, token).reason == "stale"
    checker.clock = lambda: time.time() - 21
    assert checker.check(ALERT_TOPIC, token).reason == "stale"
    assert checker.store.messages() == []


def test_unknown_device_is_rejected(checker, tmp_path):
    stranger = generate_private_key(tmp_path / "stranger.pem")
    verdict = checker.check(ALERT_TOPIC, signed(stranger, alert()))
    assert verdict.reason == "unknown_device" and "is not enrolled" in verdict.detail


def test_device_id_not_matching_the_key_is_rejected(checker, device_key):
    verdict = checker.check("edge/site-a/cp-2/alert", signed(device_key, alert(device="cp-2")))
    assert verdict.reason == "device_mismatch"
    assert "claims say site-a/cp-2 but key" in verdict.detail


def test_message_on_another_devices_topic_is_rejected(checker, device_key):
    assert checker.check("edge/site-a/cp-9/alert", signed(device_key, alert())).reason == "topic_mismatch"


@pytest.mark.parametrize("alg", ["none", "HS256"])
def test_algorithms_other_than_ed25519_are_rejected(checker, device_key, alg):
    payload = json.dumps(alert()).encode()
    header = {"alg": alg, "kid": key_id(device_key)}
    if alg == "none":
        token = f"{b64(json.dumps(header).encode())}.{b64(payload)}.".encode()
    else:
        token = jws.serialize_compact(header, payload, OctKey.import_key(device_key.as_dict()["x"])).encode()
    verdict = checker.check(ALERT_TOPIC, token)
    assert verdict.reason == "algorithm_not_allowed"
    assert checker.counters["algorithm_not_allowed"] == 1


def test_garbage_and_missing_claims_are_malformed(checker, device_key):
    assert checker.check(ALERT_TOPIC, b"not a jws").reason == "malformed"
    claims = alert()
    del claims["seq"]
    verdict = checker.check(ALERT_TOPIC, signed(device_key, claims))
    assert verdict.reason == "malformed" and "claims invalid at seq: Field required" in verdict.detail


def test_oversized_message_is_rejected(checker):
    assert checker.check(ALERT_TOPIC, b"x" * 70_000).reason == "oversized"
