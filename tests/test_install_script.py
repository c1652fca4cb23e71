"""scripts/install-pi.sh, run against a temporary root: the plan, and a real install of a call point."""

import subprocess

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "install-pi.sh"


def run(*args, check=True):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, check=check, timeout=600)


def test_dry_run_plans_a_camera_box(tmp_path):
    plan = run("--kind", "camera-box", "--root", str(tmp_path), "--dry-run").stdout
    assert "would install python3-venv python3-lgpio mosquitto-clients python3-picamera2" in plan
    assert f"+ python3 -m venv --system-site-packages {tmp_path}/opt/edge-agent" in plan
    assert f"install {REPO}[detect]" in plan
    assert "models fetch ssd-mobilenet-v1-coco-quant" in plan and "models fetch blazeface-full-range" in plan
    assert f"{tmp_path}/etc/systemd/system/edge-agent.service" in plan
    assert not any(tmp_path.iterdir())  # a dry run touches nothing


def test_bad_arguments_are_refused(tmp_path):
    result = run("--kind", "lamp", "--root", str(tmp_path), check=False)
    assert (
        result.returncode == 2
        and "--kind must be call-point, building-button or camera-box, not 'lamp'" in result.stderr
    )


def test_call_point_install_below_a_root_is_light_and_runs(tmp_path):
    result = run("--kind", "call-point", "--root", str(tmp_path))
    assert "Installed. Next:" in result.stdout
    prefix = tmp_path / "opt/edge-agent"
    version = subprocess.run([prefix / "bin/edge-agent", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("edge-agent ")
    site = next((prefix / "lib").glob("python3*/site-packages"))
    installed = {p.name.lower() for p in site.iterdir()}
    assert not {n for n in installed if n.startswith(("numpy", "cv2", "opencv", "ai_edge_litert", "tflite"))}
    assert (tmp_path / "etc/systemd/system/edge-agent.service").read_text() == (
        REPO / "systemd/edge-agent.service"
    ).read_text()
    assert oct((tmp_path / "etc/edge-agent/credentials").stat().st_mode & 0o777) == "0o700"
