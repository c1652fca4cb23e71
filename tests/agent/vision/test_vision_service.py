"""A camera box as it runs: vision in its own process, its faults reported once, the buttons never blocked."""

import os
import shutil
import time

import pytest

from agent.device.agent import Agent
from tests.agent.vision.scenes import MODEL_DIR, VIDEO, require_shared
from tests.conftest import wait_until

BUTTON = '[[buttons]]\nname = "help"\npin = 17\n'


def camera_box(site, source, model_dir, rules="", extra=""):
    body = (
        f'{BUTTON}\n[camera]\nsource = "{source}"\nname = "plaza"\nrealtime = true\nreconnect_max_s = 2\n\n'
        f'[detector]\nmodel_dir = "{model_dir}"\n\n[vision]\nstall_s = 3\nrestart_max_s = 2\n{extra}\n{rules}'
    )
    return site.add_device("cam-1", kind="camera-box", body=body)


def press_and_get_acknowledged(agent, mock_factory, receiver):
    before = len(receiver.store.messages(kind="alert"))
    pin = mock_factory.pin(17)
    pin.drive_low()
    pin.drive_high()
    time.sleep(0.05)
    assert wait_until(lambda: len(receiver.store.messages(kind="alert")) > before, 10)
    assert wait_until(lambda: not [e for e in agent.outbox.entries() if e.kind == "alert"], 10)


def faults(receiver):
    return [m.claims["body"] for m in receiver.store.messages(kind="event") if "fault" in m.claims["body"]]


def test_grouping_on_the_plaza_reaches_the_centre_signed(site, receiver, mock_factory):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    rules = '[[rules]]\nname = "crowd"\ntype = "grouping"\nmin_count = 5\nmin_duration_s = 1\n'
    config = camera_box(site, VIDEO, MODEL_DIR, rules, extra="[telemetry]\ninterval_s = 5\n")
    with Agent(config, pin_factory=mock_factory) as agent:
        assert wait_until(
            lambda: [m for m in receiver.store.messages(kind="alert") if m.claims["body"].get("rule")], 30
        )
        (alert,) = [m for m in receiver.store.messages(kind="alert") if m.claims["body"].get("rule")]
        body = alert.claims["body"]
        assert (body["rule"], body["phase"], body["camera"], body["source"]) == ("crowd", "start", "plaza", "camera")
        assert "evidence" not in body  # metadata only unless a rule asks for evidence
        press_and_get_acknowledged(agent, mock_factory, receiver)
        assert wait_until(
            lambda: any(
                (m.claims["body"].get("vision") or {}).get("frames") for m in receiver.store.messages(kind="telemetry")
            ),
            15,
        )
        vision = [
            m.claims["body"]["vision"]
            for m in receiver.store.messages(kind="telemetry")
            if (m.claims["body"].get("vision") or {}).get("frames")
        ][-1]
        assert vision["runtime"] == "litert" and vision["model"] == "ssd-mobilenet-v1-coco-quant"
        assert {"camera_fps", "frames_skipped_by_motion", "inference_ms_avg", "tracked_objects"} <= set(vision)


@pytest.mark.parametrize("spoil", ["missing", "wrong-sha"])
def test_bad_model_is_reported_once_and_buttons_keep_working(site, receiver, mock_factory, tmp_path, spoil):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    if spoil == "wrong-sha":
        shutil.copy(MODEL_DIR / "ssd_mobilenet_v1_coco_quant.tflite", model_dir)
        with (model_dir / "ssd_mobilenet_v1_coco_quant.tflite").open("ab") as handle:
            handle.write(b"tampered")
    with Agent(camera_box(site, VIDEO, model_dir), pin_factory=mock_factory) as agent:
        assert wait_until(lambda: faults(receiver), 30)
        press_and_get_acknowledged(agent, mock_factory, receiver)
        time.sleep(5)  # the supervisor retries with backoff meanwhile
        assert agent.vision.restarts >= 1
    (fault,) = faults(receiver)  # reported once, not on every retry
    expected = "does not exist; fetch it with" if spoil == "missing" else "but the manifest expects"
    assert fault["fault"] == "detector" and expected in fault["message"]


def test_camera_that_cannot_be_opened_is_a_fault_not_a_crash(site, receiver, mock_factory, tmp_path):
    require_shared("models/ssd_mobilenet_v1_coco_quant.tflite")
    with Agent(camera_box(site, "/dev/video97", MODEL_DIR), pin_factory=mock_factory) as agent:
        assert wait_until(lambda: faults(receiver), 30)
        press_and_get_acknowledged(agent, mock_factory, receiver)
        time.sleep(4)
    (fault,) = faults(receiver)
    assert fault == {
        "fault": "camera",
        "state": "fault",
        "message": "camera source /dev/video97: cannot be opened by OpenCV",
    }


def test_hung_camera_is_restarted_and_buttons_keep_working(site, receiver, mock_factory, tmp_path):
    require_shared("models/ssd_mobilenet_v1_coco_quant.tflite")
    fifo = tmp_path / "stuck-stream"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a camera that hangs
    with Agent(camera_box(site, fifo, MODEL_DIR), pin_factory=mock_factory) as agent:
        assert wait_until(lambda: faults(receiver), 30)
        press_and_get_acknowledged(agent, mock_factory, receiver)
        assert wait_until(lambda: agent.vision.restarts >= 2, 30)
    (fault,) = faults(receiver)
    assert fault["fault"] == "vision" and "stalled (no progress for 3 s)" in fault["message"]


def test_camera_alerts_are_held_not_lost_while_the_outbox_cannot_store(site, receiver, mock_factory):
    """A storage fault once killed the vision supervisor: camera alerts stopped while the watchdog kept pinging."""
    import sqlite3

    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    rules = '[[rules]]\nname = "crowd"\ntype = "grouping"\nmin_count = 5\nmin_duration_s = 1\n'
    config = camera_box(site, VIDEO, MODEL_DIR, rules)
    with Agent(config, pin_factory=mock_factory) as agent:
        disk = sqlite3.connect(config.outbox_path)  # another writer breaks the card, as it were
        disk.execute("CREATE TRIGGER full BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        disk.commit()
        assert wait_until(lambda: agent.health()["held_in_memory"] > 0, 30)  # the crowd alert, held
        assert agent.vision.guard.is_alive and agent.problems() == []
        disk.execute("DROP TRIGGER full")
        disk.commit()
        assert wait_until(
            lambda: [m for m in receiver.store.messages(kind="alert") if m.claims["body"].get("rule") == "crowd"], 20
        )
        assert wait_until(lambda: agent.health()["held_in_memory"] == 0, 10)  # stored once the disk takes writes
        assert agent.vision.guard.errors == {}
        disk.close()
