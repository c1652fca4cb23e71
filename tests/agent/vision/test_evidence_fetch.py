"""Evidence leaves the camera box only when the centre asks, signed both ways, sealed for the centre, matching the alert."""

import hashlib
import json
import time
import uuid

import cv2
import pytest

from agent.cli import main
from agent.device.agent import Agent
from agent.device.evidence_server import UsedRequests, answer_request
from agent.protocol.evidence import RequestRefused
from agent.protocol.messages import EvidenceRequest
from agent.protocol.sealing import centre_key_set, generate_encryption_key, parse_centre_keys, unseal
from agent.protocol.signing import MessageSigner, generate_private_key, verify
from tests.agent.broker_spy import BrokerSpy
from tests.agent.vision.scenes import VIDEO, require_shared
from tests.conftest import wait_until

RULE = (
    '[[rules]]\nname = "crowd"\ntype = "grouping"\nmin_count = 5\nmin_duration_s = 1\nevidence = true\n'
    "[evidence]\nretention_s = 600\n"
)


def fetch_evidence(site, ref, out):
    config = str(site.receiver_toml_path())
    return main(["receiver", "fetch-evidence", "--config", config, "--device", "cam-ev", ref, "--out", str(out)])


def test_centre_fetches_the_redacted_image_named_in_the_signed_alert(
    site, receiver, mock_factory, tmp_path, capsys, model_dir_with_faces
):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    body = f'[camera]\nsource = "{VIDEO}"\nrealtime = true\n[detector]\nmodel_dir = "{model_dir_with_faces}"\n{RULE}'
    config = site.add_device("cam-ev", kind="camera-box", body=body)
    with BrokerSpy(site) as spy, Agent(config, pin_factory=mock_factory):
        assert wait_until(lambda: receiver.store.messages(kind="alert"), 40)
        (alert,) = receiver.store.messages(kind="alert")
        evidence = alert.claims["body"]["evidence"]
        assert evidence["ref"].startswith("evidence/") and len(evidence["sha256"]) == 64
        assert len(json.dumps(alert.claims)) < 4096  # metadata only: the image never rides in the alert
        out = tmp_path / "evidence.jpg"
        assert fetch_evidence(site, evidence["ref"], out) == 0
        assert "sha256 matches the signed alert" in capsys.readouterr().out
        assert hashlib.sha256(out.read_bytes()).hexdigest() == evidence["sha256"]
        assert cv2.imread(str(out)).shape == (576, 768, 3)
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        assert spy.on("evidence") and spy.found(out.read_bytes()) == []  # sealed for the centre on the broker
        assert fetch_evidence(site, "evidence/00000000-0000-0000-0000-000000000000.jpg", out) == 1
        assert "no stored alert from cam-ev names evidence" in capsys.readouterr().err


def test_device_answers_only_genuine_fresh_first_time_requests(tmp_path):
    centre = generate_private_key(tmp_path / "centre.pem")
    centre_enc = generate_encryption_key(tmp_path / "centre-enc.pem")
    impostor = generate_private_key(tmp_path / "impostor.pem")
    device_key = generate_private_key(tmp_path / "device.pem")
    device = MessageSigner(device_key)
    keys = parse_centre_keys(centre_key_set(centre, centre_enc), "centre.jwk")
    (tmp_path / "ev").mkdir()
    name = "0f8fad5b-d9cb-469f-a165-70867728950e.jpg"
    (tmp_path / "ev" / name).write_bytes(b"\xff\xd8jpeg")
    used = UsedRequests(tmp_path / "state" / "used.sqlite")

    def request(key, sent):
        claims = EvidenceRequest(device="cam-1", ref=f"evidence/{name}", request_id=uuid.uuid4(), sent=sent)
        return MessageSigner(key).sign(claims.model_dump(mode="json")).encode()

    def refusal(payload):
        with pytest.raises(RequestRefused) as refused:
            answer(payload)
        return refused.value.reason

    def answer(payload):
        return answer_request(
            payload, device="cam-1", centre_keys=keys, signer=device, evidence_dir=tmp_path / "ev", used=used
        )

    genuine = request(centre, time.time())
    sent = verify(answer(genuine).payload, device_key, large=True)
    assert sent["jpeg_jwe"].count(".") == 4 and "jpeg_b64" not in sent
    assert unseal(sent["jpeg_jwe"], centre_enc) == b"\xff\xd8jpeg"
    assert refusal(genuine) == "replayed"
    assert refusal(request(impostor, time.time())) == "bad_signature"
    assert refusal(request(centre, time.time() - 120)) == "stale"
    (tmp_path / "ev" / name).unlink()  # retention ran
    reply = verify(answer(request(centre, time.time())).payload, device_key, large=True)
    assert reply["error"].startswith("not found: expired") and reply["jpeg_jwe"] is None
