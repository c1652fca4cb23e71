"""Evidence stays confidential end to end: sealed for the centre, each request answered once, hostile input survived.

A camera box's evidence side (its MQTT link and EvidenceServer, from a real
device config and real keys) talks to the centre's fetcher over a real
mosquitto, while a third client subscribed to '#' sees everything the broker
carries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
import uuid

import cv2
import numpy as np
import pytest

from agent.centre.evidence_fetch import fetch, open_reply
from agent.centre.keyring import Keyring
from agent.config.device import AgentConfig
from agent.config.secrets import resolve_secret
from agent.device.agent import Agent
from agent.device.evidence_server import USED_IDS_FILE, EvidenceServer, UsedRequests
from agent.errors import ConfigError, KeyFileError
from agent.mqtt.link import MqttLink
from agent.protocol.enrolment import enrolment_record
from agent.protocol.evidence import EvidenceError, ReplyIgnored
from agent.protocol.messages import EvidenceReply, EvidenceRequest, TopicLayout
from agent.protocol.sealing import (
    CentreKeys,
    centre_key_set,
    generate_encryption_key,
    load_centre_keys,
    load_encryption_key,
    parse_centre_keys,
    seal,
)
from agent.protocol.signing import MessageSigner, generate_private_key, load_private_key, public_jwk
from tests.agent.broker_spy import BrokerSpy, readings
from tests.conftest import wait_until

CAMERA = (
    '[camera]\nsource = "no-camera-needed.avi"\n'
    '[[rules]]\nname = "crowd"\ntype = "grouping"\nmin_count = 5\nmin_duration_s = 1\nevidence = true\n'
)
DEVICE = "cam-1"


def redacted_jpeg() -> bytes:
    """A real JPEG, as the pipeline writes them (a gradient with some structure, quality 80)."""
    y, x = np.mgrid[0:240, 0:320]
    image = np.dstack([(x * 255 // 320), (y * 255 // 240), ((x + y) % 256)]).astype(np.uint8)
    cv2.putText(image, "EVIDENCE", (40, 130), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 3)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return data.tobytes()


def store_evidence(config: AgentConfig, jpeg: bytes) -> tuple[str, str]:
    """Put an image where the pipeline would; returns the (ref, sha256) its alert would carry."""
    config.evidence_dir.mkdir(parents=True, exist_ok=True)
    name = f"{uuid.uuid4()}.jpg"
    (config.evidence_dir / name).write_bytes(jpeg)
    return f"evidence/{name}", hashlib.sha256(jpeg).hexdigest()


class CameraEnd:
    """The evidence side of a camera box: its own link and EvidenceServer, wired as the Agent wires them."""

    def __init__(self, config: AgentConfig, centre_keys: CentreKeys | None = None):
        self.link = MqttLink(config.mqtt, client_id=f"edge-{config.device.id}", secret_dirs=config.secret_dirs)
        keys = centre_keys or load_centre_keys(resolve_secret(config.identity.centre_key_file, *config.secret_dirs))
        self.server = EvidenceServer(
            self.link,
            TopicLayout(config.mqtt.topic_prefix),
            site=config.device.site,
            device=config.device.id,
            signer=MessageSigner(
                load_private_key(resolve_secret(config.identity.private_key_file, *config.secret_dirs))
            ),
            centre_keys=keys,
            evidence_dir=config.evidence_dir,
            state_dir=config.state_dir,
        )
        self.link.on_message = lambda topic, payload: self.server.submit(payload)
        self.link.start()
        assert self.link.wait_subscribed(10), "the camera could not subscribe to its evidence requests"

    def __enter__(self) -> CameraEnd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.link.close()
        self.server.close()


def centre_fetch(site, ref: str, sha256: str, timeout_s: float = 10.0) -> bytes:
    """What 'receiver fetch-evidence' does once it has found the alert."""
    config = site.receiver_config

    def secret(name: str):
        return resolve_secret(name, *config.secret_dirs)

    with MqttLink(
        config.mqtt, client_id="centre-1-evidence", secret_dirs=config.secret_dirs, session_expiry_s=0
    ) as link:
        link.start()
        assert link.wait_connected(10)
        return fetch(
            link,
            TopicLayout(site.prefix),
            MessageSigner(load_private_key(secret(config.receiver.signing_key_file))),
            site.keyring,
            load_encryption_key(secret(config.receiver.encryption_key_file)),
            site=site.site,
            device=DEVICE,
            ref=ref,
            expected_sha256=sha256,
            timeout_s=timeout_s,
        )


@pytest.fixture
def camera_config(site) -> AgentConfig:
    return site.add_device(DEVICE, kind="camera-box", body=CAMERA)


def test_the_broker_never_carries_the_image_while_the_centre_gets_it_exactly(site, camera_config):
    jpeg = redacted_jpeg()
    ref, sha256 = store_evidence(camera_config, jpeg)
    with BrokerSpy(site) as spy, CameraEnd(camera_config) as camera:
        assert centre_fetch(site, ref, sha256) == jpeg
        assert wait_until(lambda: spy.on("evidence"), 5)
        assert camera.server.counters == {"images_sent": 1}
        assert spy.found(jpeg) == []  # no payload, decoded every way, holds the JPEG or a slice of it
        reply = json.loads(next(r for r in readings(spy.on("evidence")[0]) if r.startswith(b'{"device"')))
        assert reply["sha256"] == sha256 and reply["jpeg_jwe"].count(".") == 4
        # The same spy does find the image in the old, plaintext form of the reply: the check can fail.
        signer = MessageSigner(load_private_key(camera_config.secret_dirs[0] / "device-key.pem"))
        spy.publish("elsewhere/plain", signer.sign({"jpeg_b64": base64.b64encode(jpeg).decode()}, large=True).encode())
        assert wait_until(lambda: spy.found(jpeg) == ["elsewhere/plain"], 5)


def test_a_replayed_request_gets_no_second_image_even_after_a_restart(site, camera_config):
    ref, sha256 = store_evidence(camera_config, redacted_jpeg())
    request_topic = TopicLayout(site.prefix).topic(site.site, DEVICE, "evidence-request")
    with BrokerSpy(site) as spy:
        with CameraEnd(camera_config) as camera:
            centre_fetch(site, ref, sha256)
            (captured,) = spy.on("evidence-request")
            spy.publish(request_topic, captured)  # a genuine request, seconds old, published again
            assert wait_until(lambda: camera.server.counters.get("replayed") == 1, 5)
            assert camera.server.counters == {"images_sent": 1, "replayed": 1}
        used_ids = camera_config.state_dir / USED_IDS_FILE
        assert stat.S_IMODE(used_ids.stat().st_mode) == 0o600
        with CameraEnd(camera_config) as restarted:  # the used id survived the restart
            spy.publish(request_topic, captured)
            assert wait_until(lambda: restarted.server.counters.get("replayed") == 1, 5)
        assert len(spy.on("evidence")) == 1


def test_used_ids_are_forgotten_once_their_request_could_no_longer_be_fresh(tmp_path):
    used = UsedRequests(tmp_path / USED_IDS_FILE)
    assert used.claim("a", keep_until=100.0, now=0.0)
    assert not used.claim("a", keep_until=100.0, now=50.0)
    assert used.claim("b", keep_until=300.0, now=200.0)  # pruned "a" on the way
    assert used.claim("a", keep_until=300.0, now=200.0)
    used.close()


def test_hostile_requests_leave_the_server_answering(site, camera_config, tmp_path):
    ref, sha256 = store_evidence(camera_config, redacted_jpeg())
    request_topic = TopicLayout(site.prefix).topic(site.site, DEVICE, "evidence-request")

    def b64url(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    crit = b".".join([b64url(b'{"alg":"Ed25519","crit":5}'), b64url(b"{}"), b64url(bytes(64))])
    impostor = MessageSigner(generate_private_key(tmp_path / "impostor.pem"))
    forged = EvidenceRequest(device=DEVICE, ref=ref, request_id=uuid.uuid4(), sent=time.time())
    hostile = [
        b"\x00\xff garbage",
        crit,
        b"x" * 300_000,
        impostor.sign(forged.model_dump(mode="json")).encode(),
        MessageSigner(load_private_key(site.centre_dir / "credentials/centre-key.pem")).sign({"kind": "?"}).encode(),
    ]
    with BrokerSpy(site) as spy, CameraEnd(camera_config) as camera:
        for payload in hostile:
            spy.publish(request_topic, payload)
        assert wait_until(lambda: sum(camera.server.counters.values()) == len(hostile), 10)
        assert camera.server.counters == {"malformed": 4, "bad_signature": 1}
        assert spy.on("evidence") == []
        assert centre_fetch(site, ref, sha256) == (camera_config.evidence_dir / ref.split("/")[1]).read_bytes()


def test_the_fetcher_refuses_an_image_sealed_for_another_key(site, camera_config, tmp_path):
    ref, sha256 = store_evidence(camera_config, redacted_jpeg())
    centre = load_centre_keys(camera_config.secret_dirs[0] / "centre.jwk")
    other = generate_encryption_key(tmp_path / "other-enc.pem")
    stale_keys = CentreKeys(
        centre.signing, parse_centre_keys(centre_key_set(centre.signing, other), "x").encryption, "x"
    )
    with CameraEnd(camera_config, centre_keys=stale_keys):
        with pytest.raises(EvidenceError, match="cannot be opened with this centre's key: sealed for key"):
            centre_fetch(site, ref, sha256)


def test_the_fetcher_skips_forged_replies_and_takes_the_genuine_one(site, camera_config):
    jpeg = redacted_jpeg()
    ref, sha256 = store_evidence(camera_config, jpeg)
    evidence_topic = TopicLayout(site.prefix).topic(site.site, DEVICE, "evidence")
    with BrokerSpy(site) as spy, CameraEnd(camera_config):
        centre_fetch(site, ref, sha256)
        (genuine,) = spy.on("evidence")
        header, payload, signature = genuine.split(b".")
        altered = bytearray(payload)
        altered[len(altered) // 2] ^= 0x01
        spy.publish(evidence_topic, b".".join([header, bytes(altered), signature]), retain=True)  # first in line
        assert centre_fetch(site, ref, sha256) == jpeg


class TestOpenReply:
    """The fetcher's checks on one reply, without a broker."""

    @pytest.fixture
    def world(self, tmp_path):
        device_key = generate_private_key(tmp_path / "device.pem")
        keyring = Keyring(tmp_path / "keyring")
        keyring.enroll(enrolment_record(DEVICE, "s", "camera-box", device_key))
        centre_enc = generate_encryption_key(tmp_path / "enc.pem")
        return MessageSigner(device_key), keyring, centre_enc

    def reply(self, signer, jwe: str, sha256: str, request_id: str) -> bytes:
        claims = EvidenceReply(
            device=DEVICE, ref=REF, request_id=request_id, sent=time.time(), sha256=sha256, jpeg_jwe=jwe
        )
        return signer.sign(claims.model_dump(mode="json"), large=True).encode()

    def open(self, payload: bytes, keyring, key, request_id: str, sha256: str) -> bytes:
        return open_reply(
            payload,
            keyring=keyring,
            decryption_key=key,
            device=DEVICE,
            ref=REF,
            request_id=request_id,
            expected_sha256=sha256,
        )

    def test_checks(self, world, tmp_path):
        signer, keyring, centre_enc = world
        jpeg, request_id = redacted_jpeg(), str(uuid.uuid4())
        sha256 = hashlib.sha256(jpeg).hexdigest()
        jwe = seal(jpeg, centre_enc)
        good = self.reply(signer, jwe, sha256, request_id)
        assert self.open(good, keyring, centre_enc, request_id, sha256) == jpeg

        head, ek, iv, ciphertext, tag = jwe.split(".")
        flipped = ciphertext[:100] + ("A" if ciphertext[100] != "A" else "B") + ciphertext[101:]
        altered_jwe = self.reply(signer, ".".join([head, ek, iv, flipped, tag]), sha256, request_id)
        with pytest.raises(EvidenceError, match="cannot be opened with this centre's key"):
            self.open(altered_jwe, keyring, centre_enc, request_id, sha256)

        other = generate_encryption_key(tmp_path / "other.pem")
        with pytest.raises(EvidenceError, match="sealed for key .*, not this centre's key"):
            self.open(good, keyring, other, request_id, sha256)

        with pytest.raises(EvidenceError, match="does not match the sha256 in its signed alert"):
            self.open(self.reply(signer, jwe, "0" * 64, request_id), keyring, centre_enc, request_id, "0" * 64)

        with pytest.raises(ReplyIgnored, match="answers request"):
            self.open(good, keyring, centre_enc, str(uuid.uuid4()), sha256)
        impostor = MessageSigner(generate_private_key(tmp_path / "impostor.pem"))
        with pytest.raises(ReplyIgnored, match="not cam-1's enrolled key"):
            self.open(self.reply(impostor, jwe, sha256, request_id), keyring, centre_enc, request_id, sha256)
        header, payload, signature = good.split(b".")
        with pytest.raises(ReplyIgnored, match="bad_signature"):
            self.open(
                b".".join([header, payload[:-8] + b"AAAAAAAA", signature]), keyring, centre_enc, request_id, sha256
            )
        plain = signer.sign({"device": DEVICE, "jpeg_b64": base64.b64encode(jpeg).decode()}, large=True).encode()
        with pytest.raises(ReplyIgnored, match="malformed: claims invalid"):
            self.open(plain, keyring, centre_enc, request_id, sha256)


REF = "evidence/0f8fad5b-d9cb-469f-a165-70867728950e.jpg"


# Centre keys on the device.


def test_a_camera_box_taking_evidence_without_the_centres_encryption_key_does_not_start(site, mock_factory):
    config = site.add_device(DEVICE, kind="camera-box", body=CAMERA)
    centre_jwk = config.secret_dirs[0] / config.identity.centre_key_file
    centre_jwk.write_text(json.dumps(site.centre_jwk))  # an installation from before evidence was sealed
    with pytest.raises(ConfigError, match="holds only the centre's signing key, but rule\\(s\\) crowd set evidence"):
        Agent(config, pin_factory=mock_factory)
    call_point = site.add_device("cp-1")
    (call_point.secret_dirs[0] / "centre.jwk").write_text(json.dumps(site.centre_jwk))
    with Agent(call_point, pin_factory=mock_factory):  # a call point needs the signing key only
        pass


@pytest.mark.parametrize(
    "document, problem",
    [
        ({"keys": []}, "holds one Ed25519 key"),
        ({"keys": "x"}, "expected a public JWK or a JWK Set"),
        ([1], "expected a public JWK or a JWK Set"),
        ("sig+enc+private", "only the public JWK may be shared"),
        ("two-enc", "at most one X25519 key"),
        ("wrong-use", "has use 'sig'; expected 'enc'"),
        ("wrong-kid", "is not the key's thumbprint"),
    ],
)
def test_centre_key_sets_are_checked(tmp_path, document, problem):
    sig = generate_private_key(tmp_path / "sig.pem")
    enc = generate_encryption_key(tmp_path / "enc.pem")
    keys = centre_key_set(sig, enc)["keys"]
    made = {
        "sig+enc+private": {"keys": [{**keys[0], "d": "AAAA"}, keys[1]]},
        "two-enc": {"keys": [*keys, keys[1]]},
        "wrong-use": {"keys": [keys[0], {**keys[1], "use": "sig"}]},
        "wrong-kid": {"keys": [keys[0], {**keys[1], "kid": "nope"}]},
    }
    with pytest.raises(KeyFileError, match=problem):
        parse_centre_keys(made[document] if isinstance(document, str) else document, "centre.jwk")


def test_both_centre_key_forms_load(tmp_path):
    sig = generate_private_key(tmp_path / "sig.pem")
    enc = generate_encryption_key(tmp_path / "enc.pem")
    single = parse_centre_keys(public_jwk(sig), "centre.jwk")
    assert single.encryption is None and single.signing.thumbprint() == sig.thumbprint()
    both = parse_centre_keys(centre_key_set(sig, enc), "centre.jwk")
    assert both.encryption.thumbprint() == enc.thumbprint()
    assert stat.S_IMODE(os.stat(tmp_path / "enc.pem").st_mode) == 0o600
