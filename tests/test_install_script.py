"""scripts/install-pi.sh, run against a temporary root: the plan, and a real install of a call point."""

import shutil
import subprocess

import pytest

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


def test_dry_run_on_plain_debian_takes_lgpio_from_pypi_and_the_opencv_backend(tmp_path):
    plan = run("--kind", "camera-box", "--base", "debian", "--root", str(tmp_path), "--dry-run").stdout
    assert plan.count("python3-picamera2 does not exist here") == 1  # said once
    assert "would install python3-venv mosquitto-clients\n" in plan
    assert f"install {REPO}[detect,pi] -c {REPO}/scripts/constraints/camera-box.txt" in plan
    assert "--from" not in plan


def test_dry_run_pins_each_kind_and_takes_a_model_mirror(tmp_path):
    plan = run("--kind", "camera-box", "--root", str(tmp_path), "--dry-run", "--model-from", "file:///m.tflite").stdout
    assert "models fetch ssd-mobilenet-v1-coco-quant" in plan and "--from file:///m.tflite" in plan
    for kind in ("call-point", "building-button"):
        plan = run("--kind", kind, "--root", str(tmp_path), "--dry-run").stdout
        assert f"install {REPO} -c {REPO}/scripts/constraints/{kind}.txt" in plan
        assert (REPO / f"scripts/constraints/{kind}.txt").read_text().count("==") >= 10


@pytest.mark.skipif(
    shutil.which("apt-cache") is None
    or subprocess.run(["apt-cache", "show", "python3-picamera2"], capture_output=True).returncode == 0,
    reason="needs apt without the Raspberry Pi archive (plain Debian)",
)
def test_raspios_packages_missing_from_apt_stop_before_anything_is_installed():
    result = run("--kind", "camera-box", "--base", "raspios", "--dry-run", check=False)
    assert result.returncode == 1
    assert "apt has no package python3-lgpio python3-picamera2 here (base raspios); nothing was installed" in (
        result.stderr
    )
    assert "apt-get install" not in result.stdout and "useradd" not in result.stdout


def test_bad_arguments_are_refused(tmp_path):
    result = run("--kind", "lamp", "--root", str(tmp_path), check=False)
    assert (
        result.returncode == 2
        and "--kind must be call-point, building-button or camera-box, not 'lamp'" in result.stderr
    )
    result = run("--base", "ubuntu", "--root", str(tmp_path), check=False)
    assert result.returncode == 2 and "--base must be auto, raspios or debian, not 'ubuntu'" in result.stderr


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
