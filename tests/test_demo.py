"""The README's main-job command, headless and bounded, as CI runs it."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import SHARED_DIR

DEMO_VIDEO = SHARED_DIR / "data/vtest.avi"
DEMO_MODEL = SHARED_DIR / "models/ssd_mobilenet_v1_coco_quant.tflite"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One headless 12 s run of the demo, shared by the call-point and the camera checks."""
    workdir = tmp_path_factory.mktemp("demo")
    picture = workdir / "demo.png"
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--seconds", "12", "--out", str(picture)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=workdir,
    )
    return SimpleNamespace(result=result, out=result.stdout, picture=picture)


def test_demo_runs_headless_and_prints_its_summary(demo):
    assert demo.result.returncode == 0, demo.result.stdout + demo.result.stderr
    out = demo.out
    assert "centre ⚠ ALERT demo-site/call-point-1: assistance from button 'help'" in out
    assert "call point: LED shows 'acknowledged'" in out
    assert "summary:" in out and "help button acknowledged on the device: True" in out
    assert "Traceback" not in demo.result.stderr


def test_demo_camera_box_raises_an_alert_and_draws_its_picture(request):
    missing = [str(path) for path in (DEMO_VIDEO, DEMO_MODEL) if not path.exists()]
    if missing:
        pytest.skip(f"demo footage or model absent: {', '.join(missing)} (set EDGE_AGENT_SHARED)")
    demo = request.getfixturevalue("demo")  # only now: no 12 s demo run just to skip
    assert demo.result.returncode == 0, demo.result.stdout + demo.result.stderr
    assert "centre ⚠ ALERT demo-site/camera-box-1" in demo.out
    assert demo.picture.exists()


def test_ctrl_c_stops_the_demo_cleanly(tmp_path):
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "demo", "--seconds", "60", "--out", str(tmp_path / "x.png")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "someone holds the silent duress button" in line:
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "stopped (Ctrl-C); everything closed cleanly" in out
    assert "Traceback" not in err
