"""The centre's signed snapshot command on real parts: a camera box on real footage and a real model, a real
broker and receiver; the picture is redacted like evidence and crosses the broker sealed for the centre."""

import hashlib
import json

import cv2

from agent.cli import main
from agent.device.agent import Agent
from tests.agent.broker_spy import BrokerSpy
from tests.agent.vision.scenes import VIDEO, require_shared
from tests.conftest import wait_until

BUTTONS = '[[buttons]]\nname = "help"\npin = 17\nlocation = "Plaza"\n'
MASK = "[[privacy_masks]]\npolygon = [[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.5]]\n"
RULE = '[[rules]]\nname = "crowd"\ntype = "grouping"\nmin_count = 50\nmin_duration_s = 1\nevidence = true\n'


def snapshot(site, device: str, out, capsys) -> tuple[int, dict]:
    capsys.readouterr()
    config = str(site.receiver_toml_path())
    code = main(["centre", "command", "snapshot", "--device", device, "--config", config, "--out", str(out)])
    printed = capsys.readouterr().out
    return code, json.loads(printed) if printed else {}


def test_a_snapshot_is_redacted_like_evidence_and_fetched_sealed(
    site, receiver, mock_factory, tmp_path, capsys, model_dir_with_faces
):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    body = (
        f'{BUTTONS}[camera]\nsource = "{VIDEO}"\nrealtime = true\nloop = true\n'
        f'[detector]\nmodel_dir = "{model_dir_with_faces}"\n{MASK}{RULE}'
    )
    config = site.add_device("cam-1", kind="camera-box", body=body)
    with BrokerSpy(site) as spy, Agent(config, pin_factory=mock_factory) as agent:
        assert wait_until(lambda: agent.vision.stats.get("frames"), 60)
        out = tmp_path / "snapshot.jpg"
        code, answer = snapshot(site, "cam-1", out, capsys)
        assert code == 0 and answer["outcome"] == "done", answer
        evidence = answer["result"]["evidence"]
        assert evidence["ref"] == f"evidence/{answer['command_id']}.jpg"
        data = out.read_bytes()
        assert hashlib.sha256(data).hexdigest() == evidence["sha256"]  # what the signed answer promised
        image = cv2.imread(str(out))
        assert image.shape == (576, 768, 3)
        assert image[:280, :380].max() < 40  # the privacy mask, filled before the JPEG was encoded
        assert image[300:, 400:].std() > 10  # the rest of the scene is there
        assert spy.on("evidence") and spy.found(data) == []  # sealed for the centre on the broker
    assert [m.claims["body"]["command"]["outcome"] for m in receiver.store.messages(kind="event")].count("done") == 1


def test_a_device_that_keeps_no_evidence_refuses_a_snapshot(site, receiver, mock_factory, tmp_path, capsys):
    config = site.add_device("cp-1", body=BUTTONS)
    with Agent(config, pin_factory=mock_factory) as agent:
        assert agent.link.wait_subscribed(10)
        code, answer = snapshot(site, "cp-1", tmp_path / "none.jpg", capsys)
    assert code == 1 and answer["outcome"] == "refused" and "keeps no evidence" in answer["reason"]
    assert not (tmp_path / "none.jpg").exists()
