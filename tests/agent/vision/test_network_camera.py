"""A camera over the network: frames arrive, a lost stream is a fault reported once, its return a recovery."""

import socket
import subprocess
import time
from pathlib import Path

import cv2
import pytest

from agent.device.agent import Agent
from hw.camera import CameraUnavailable
from hw.camera_opencv import OpenCVCamera
from tests.agent.vision.mjpeg_server import MjpegCamera
from tests.agent.vision.scenes import MODEL_DIR, VIDEO, require_shared
from tests.conftest import wait_until

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")


@pytest.fixture
def rtsp_camera(tmp_path):
    """vtest.avi as an RTSP camera (GStreamer's RTSP server, Debian's gir1.2-gst-rtsp-server-1.0)."""
    require_shared("data/vtest.avi")
    probe = subprocess.run(
        [
            SYSTEM_PYTHON,
            "-c",
            "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer",
        ],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(
            "no RTSP server here: apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good"
        )
    capture = cv2.VideoCapture(str(VIDEO))
    for index in range(40):
        ok, image = capture.read()
        cv2.imwrite(str(tmp_path / f"frame{index:05d}.jpg"), image)
    capture.release()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([SYSTEM_PYTHON, str(RTSP_SERVER), str(port), str(tmp_path)], stdout=subprocess.PIPE)
    assert server.stdout.readline().strip() == b"ready"
    yield f"rtsp://127.0.0.1:{port}/live", server
    server.kill()
    server.wait()


def test_rtsp_camera_delivers_rgb_frames_over_tcp(rtsp_camera, ssd):
    url, _ = rtsp_camera
    with OpenCVCamera(url) as camera:
        frames = [camera.read() for _ in range(5)]
    assert all(f.rgb.shape == (576, 768, 3) for f in frames)
    assert any(d.label == "person" for d in ssd.detect(frames[-1].rgb))


def test_rtsp_camera_that_dies_raises_camera_unavailable_promptly(rtsp_camera):
    url, server = rtsp_camera
    with OpenCVCamera(url) as camera:
        camera.read()
        server.kill()
        started = time.monotonic()
        with pytest.raises(CameraUnavailable, match="stopped delivering frames"):
            for _ in range(500):
                camera.read()
        assert time.monotonic() - started < 15  # bounded read timeout, not FFmpeg's 30 s default


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
