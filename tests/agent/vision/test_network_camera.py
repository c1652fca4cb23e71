"""A camera over the network: frames arrive, a lost stream is a fault reported once, its return a recovery."""

import time

import pytest

from agent.service import Agent
from hw.camera import CameraUnavailable
from hw.camera_opencv import OpenCVCamera
from tests.agent.vision.mjpeg_server import MjpegCamera
from tests.agent.vision.scenes import MODEL_DIR, VIDEO, require_shared
from tests.conftest import wait_until


@pytest.fixture
def ip_camera():
    require_shared("data/vtest.avi")
    camera = MjpegCamera(VIDEO)
    camera.start()
    yield camera
    camera.stop()


def test_mjpeg_stream_delivers_rgb_frames(ip_camera, ssd):
    with OpenCVCamera(ip_camera.url) as camera:
        frames = [camera.read() for _ in range(5)]
    assert all(f.rgb.shape == (576, 768, 3) for f in frames)
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert all(b.timestamp > a.timestamp for a, b in zip(frames, frames[1:], strict=False))
    assert any(d.label == "person" for d in ssd.detect(frames[-1].rgb))


def test_stream_that_goes_away_raises_camera_unavailable(ip_camera):
    with OpenCVCamera(ip_camera.url) as camera:
        camera.read()
        ip_camera.stop()
        with pytest.raises(CameraUnavailable, match="stopped delivering frames"):
            for _ in range(200):
                camera.read()
    with pytest.raises(CameraUnavailable, match="cannot be opened by OpenCV"):
        OpenCVCamera(ip_camera.url).open()


def test_lost_camera_is_one_fault_then_one_recovery_and_buttons_work(ip_camera, site, receiver, mock_factory):
    require_shared("models/ssd_mobilenet_v1_coco_quant.tflite")
    body = (
        f'[[buttons]]\nname = "help"\npin = 17\n[camera]\nsource = "{ip_camera.url}"\nreconnect_max_s = 2\n'
        f'[detector]\nmodel_dir = "{MODEL_DIR}"\n[vision]\nstall_s = 10\n'
    )
    config = site.add_device("cam-ip", kind="camera-box", body=body)

    def camera_events():
        return [m.claims["body"] for m in receiver.store.messages(kind="event") if m.claims["body"].get("fault")]

    with Agent(config, pin_factory=mock_factory) as agent:
        assert wait_until(lambda: (agent.vision.stats.get("frames") or 0) > 10, 40)
        ip_camera.stop()  # the camera reboots
        assert wait_until(lambda: camera_events(), 30)
        mock_factory.pin(17).drive_low()
        mock_factory.pin(17).drive_high()
        assert wait_until(lambda: receiver.store.messages(kind="alert"), 10)
        time.sleep(5)  # several reconnect attempts meanwhile
        ip_camera.start()
        assert wait_until(lambda: len(camera_events()) == 2, 30)
    fault, recovered = camera_events()
    assert (fault["fault"], fault["state"]) == ("camera", "fault")
    assert (recovered["fault"], recovered["state"]) == ("camera", "recovered")
