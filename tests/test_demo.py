"""The README's main-job command, headless and bounded, as CI runs it."""

import subprocess
import sys

from tests.conftest import SHARED_DIR


def test_demo_runs_headless_and_prints_its_summary(tmp_path):
    picture = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--seconds", "12", "--out", str(picture)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "centre ⚠ ALERT demo-site/call-point-1: assistance from button 'help'" in out
    assert "call point: LED shows 'acknowledged'" in out
    assert "summary:" in out and "help button acknowledged on the device: True" in out
    if (SHARED_DIR / "data/vtest.avi").exists() and (SHARED_DIR / "models/ssd_mobilenet_v1_coco_quant.tflite").exists():
        assert "centre ⚠ ALERT demo-site/camera-box-1" in out
        assert picture.exists()
    assert "Traceback" not in result.stderr


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
