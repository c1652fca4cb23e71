"""``edge-agent config check`` tells an installer which camera backend this box has (plain Debian has no picamera2)."""

import importlib.util
from pathlib import Path

import pytest

from agent.cli import main
from hw.camera import backend_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NO_PICAMERA2 = importlib.util.find_spec("picamera2") is None
HAS_OPENCV = importlib.util.find_spec("cv2") is not None


@pytest.mark.skipif(not NO_PICAMERA2, reason="picamera2 is installed (a Pi)")
def test_picamera2_source_without_picamera2_names_the_package_and_the_other_backend():
    backend, problem = backend_for("picamera2:1")
    assert backend == "picamera2"
    assert "python3-picamera2" in problem and "Raspberry Pi OS" in problem and "/dev/video0" in problem


@pytest.mark.skipif(not HAS_OPENCV, reason="OpenCV is not installed")
@pytest.mark.parametrize("source", ["/dev/video0", "0", "rtsp://cam.local/stream1", "replay.mp4"])
def test_other_sources_use_opencv(source):
    assert backend_for(source) == ("opencv", None)


@pytest.mark.skipif(not NO_PICAMERA2, reason="picamera2 is installed (a Pi)")
def test_config_check_says_which_backend_is_missing(capsys, tmp_path):
    text = (EXAMPLES / "camera-box.toml").read_text()
    assert main(["config", "check", str(EXAMPLES / "camera-box.toml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("camera picamera2: picamera2 backend, not available here: python3-picamera2")
    usb = tmp_path / "usb.toml"
    usb.write_text(text.replace('source = "picamera2"', 'source = "/dev/video0"'))
    assert main(["config", "check", str(usb)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "camera /dev/video0: opencv backend, available"
        if HAS_OPENCV
        else "camera /dev/video0: opencv backend, not available here: OpenCV is not installed "
        "(install-pi.sh --kind camera-box installs it)"
    )
