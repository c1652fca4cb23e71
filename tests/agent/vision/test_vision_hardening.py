"""The vision process as installed: really nicer than the agent, a start-up that may be slow, camera logins kept secret.

The supervisor is given other entry points for its process here (a slow start, one that never
reports, one under a seccomp filter that refuses ``setpriority`` as systemd's
``SystemCallFilter=~@resources`` does); each is a real spawned process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import cv2
import pytest

from agent.cli import main
from agent.device.agent import Agent
from agent.vision.supervisor import VisionSupervisor
from agent.vision.worker import run_vision
from hw.camera import redact_url, url_with_login
from tests.agent.vision.scenes import MODEL_DIR, VIDEO, require_shared
from tests.agent.vision.test_network_camera import RTSP_SERVER, SYSTEM_PYTHON
from tests.conftest import wait_until

BUTTON = '[[buttons]]\nname = "help"\npin = 17\n'
LOGIN = ("viewer", "hunter2:p@ss/word")  # characters that must be percent-encoded in a URL


def camera_box(site, source, vision="", camera="", device="cam-1"):
    body = (
        f'{BUTTON}\n[camera]\nsource = "{source}"\nname = "plaza"\nrealtime = true\nloop = true\n'
        f"reconnect_max_s = 2\n{camera}\n"
        f'[detector]\nmodel_dir = "{MODEL_DIR}"\n\n[vision]\nrestart_max_s = 1\n{vision}\n'
    )
    return site.add_device(device, kind="camera-box", body=body)


class Reports:
    """What the supervisor hands the agent: rule messages and faults."""

    def __init__(self):
        self.faults: list[tuple[str, str, bool]] = []

    def on_message(self, kind: str, body: dict) -> None:
        pass

    def on_fault(self, component: str, text: str, recovered: bool) -> None:
        self.faults.append((component, text, recovered))


def supervise(config, worker=None) -> tuple[VisionSupervisor, Reports]:
    reports = Reports()
    return VisionSupervisor(config, reports.on_message, reports.on_fault, worker=worker), reports


def niceness(pid: int, task: int | None = None) -> int:
    """Field 19 of /proc/PID[/task/TID]/stat: the kernel's own view of the niceness."""
    path = Path(f"/proc/{pid}/stat") if task is None else Path(f"/proc/{pid}/task/{task}/stat")
    return int(path.read_text().rsplit(")", 1)[1].split()[16])


# Entry points for the vision process (module level: ``spawn`` imports them by name).


def slow_start(*args) -> None:
    time.sleep(6)  # twice stall_s before the imports and the model load even begin
    run_vision(*args)


def never_reports(*args) -> None:
    time.sleep(3600)


def without_setpriority(*args) -> None:
    """run_vision under a seccomp filter that answers setpriority with EPERM, as the unit's filter would."""
    seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
    allow, errno_action = 0x7FFF0000, 0x00050000 | errno.EPERM
    context = seccomp.seccomp_init(allow)
    assert seccomp.seccomp_rule_add(context, errno_action, seccomp.seccomp_syscall_resolve_name(b"setpriority"), 0) == 0
    assert seccomp.seccomp_load(context) == 0
    run_vision(*args)


def test_vision_process_and_its_threads_run_nicer_than_the_agent(site):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    agent_nice = os.getpriority(os.PRIO_PROCESS, 0)
    vision, reports = supervise(camera_box(site, VIDEO, vision="nice = 7"))
    with vision:
        assert wait_until(lambda: (vision.stats.get("frames") or 0) > 5, 30)
        pid = vision.pid
        tasks = [int(task) for task in os.listdir(f"/proc/{pid}/task")]
        nice = {niceness(pid, task) for task in tasks}
    assert nice == {min(19, agent_nice + 7)}  # every thread: the interpreter's and OpenCV's inherit it
    assert len(tasks) > 1 and vision.stats["nice"] == min(19, agent_nice + 7) and "nice_error" not in vision.stats
    assert reports.faults == []


def test_priority_that_cannot_be_lowered_is_reported_once_not_swallowed(site, caplog):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed here")
    agent_nice = os.getpriority(os.PRIO_PROCESS, 0)
    vision, reports = supervise(camera_box(site, VIDEO), worker=without_setpriority)
    with caplog.at_level(logging.WARNING, logger="agent.vision.supervisor"), vision:
        assert wait_until(lambda: (vision.stats.get("frames") or 0) > 20, 30)  # several heartbeats
        assert niceness(vision.pid) == agent_nice
    expected = (
        f"cannot lower the vision process's priority to nice {min(19, agent_nice + 10)}: Operation not permitted; "
        f"it runs at the agent's priority (nice {agent_nice})"
    )
    assert reports.faults == [("priority", expected, False)]  # becomes one signed fault event at the centre
    assert (vision.stats["nice"], vision.stats["nice_error"]) == (agent_nice, expected)  # and is in telemetry
    assert [r.getMessage() for r in caplog.records] == [f"priority fault: {expected}"]
    assert vision.restarts == 0  # a warning, not a reason to restart


def test_start_up_slower_than_stall_s_is_not_a_stall(site):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    config = camera_box(site, VIDEO, vision="stall_s = 3\nstartup_timeout_s = 30")
    vision, reports = supervise(config, worker=slow_start)
    with vision:
        assert wait_until(lambda: (vision.stats.get("frames") or 0) > 5, 40)
    assert vision.restarts == 0 and reports.faults == []


def test_process_that_never_reports_is_restarted_after_the_start_up_timeout(site):
    require_shared("models/ssd_mobilenet_v1_coco_quant.tflite")
    config = camera_box(site, VIDEO, vision="stall_s = 1\nstartup_timeout_s = 3")
    vision, reports = supervise(config, worker=never_reports)
    started = time.monotonic()
    with vision:
        assert wait_until(lambda: reports.faults, 15)
        failed_after = time.monotonic() - started
        assert wait_until(lambda: vision.restarts >= 1, 10)
    assert failed_after >= 3  # not after stall_s
    assert reports.faults == [("vision", "vision process did not start within 3 s", False)]


@pytest.fixture
def camera_with_login(tmp_path):
    """vtest.avi from GStreamer's RTSP server, which answers 401 Unauthorized to anyone but LOGIN."""
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    probe = [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("no RTSP server here: apt-get install python3-gi gir1.2-gst-rtsp-server-1.0")
    frames = tmp_path / "frames"
    frames.mkdir()
    capture = cv2.VideoCapture(str(VIDEO))
    for index in range(40):
        cv2.imwrite(str(frames / f"frame{index:05d}.jpg"), capture.read()[1])
    capture.release()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([SYSTEM_PYTHON, str(RTSP_SERVER), str(port), str(frames), *LOGIN], stdout=subprocess.PIPE)
    assert server.stdout.readline().strip() == b"ready"
    yield f"rtsp://127.0.0.1:{port}/live"
    server.kill()
    server.wait()


def test_camera_password_from_a_credential_file_opens_the_stream(site, receiver, mock_factory, camera_with_login):
    camera = f'username = "{LOGIN[0]}"\npassword_file = "camera-password"'
    config = camera_box(site, camera_with_login, camera=camera)
    (config.secret_dirs[0] / "camera-password").write_text(LOGIN[1] + "\n")
    with Agent(config, pin_factory=mock_factory) as agent:
        assert wait_until(lambda: (agent.vision.stats.get("frames") or 0) > 10, 40)
        status = json.dumps(agent._cmd_status({}))
    assert LOGIN[1] not in status
    assert not [m for m in receiver.store.messages(kind="event") if "fault" in m.claims["body"]]


def test_camera_urls_are_shown_without_their_password(site, receiver, mock_factory, camera_with_login, caplog, capfd):
    inline = camera_with_login.replace("rtsp://", "rtsp://viewer:hunter3-wrong@")  # what users still write
    wrong_file = f'username = "{LOGIN[0]}"\npassword_file = "camera-password"'
    inline_box = camera_box(site, inline, device="cam-inline")
    file_box = camera_box(site, camera_with_login, camera=wrong_file, device="cam-file")
    (file_box.secret_dirs[0] / "camera-password").write_text("hunter4-wrong\n")

    def faults(device):
        events = receiver.store.messages(kind="event", device=device)
        return [m.claims["body"]["message"] for m in events if m.claims["body"].get("fault") == "camera"]

    with caplog.at_level(logging.INFO), Agent(inline_box, pin_factory=mock_factory) as agent:
        assert wait_until(lambda: faults("cam-inline"), 40)
        status = json.dumps(agent._cmd_status({}))
    mock_factory.reset()
    with caplog.at_level(logging.INFO), Agent(file_box, pin_factory=mock_factory):
        assert wait_until(lambda: faults("cam-file"), 40)
    shown = camera_with_login.replace("rtsp://", "rtsp://viewer:***@")
    assert faults("cam-inline") == [f"camera source {shown}: cannot be opened by OpenCV"]  # signed, at the centre
    assert faults("cam-file") == [f"camera source {camera_with_login}: cannot be opened by OpenCV"]
    printed = caplog.text + "".join(capfd.readouterr()) + status
    assert "camera source rtsp://viewer:***@" in printed
    assert not [secret for secret in ("hunter3", "hunter4") if secret in printed]


def test_login_is_encoded_into_the_url_and_redacted_out_of_any_text():
    url = url_with_login("rtsp://10.0.0.5:554/s1?x=1", *LOGIN)
    assert url == "rtsp://viewer:hunter2%3Ap%40ss%2Fword@10.0.0.5:554/s1?x=1"
    assert redact_url(f"camera source {url}: gone") == "camera source rtsp://viewer:***@10.0.0.5:554/s1?x=1: gone"
    assert redact_url("rtsp://admin:p@ss@cam/live and http://u:v@w/") == "rtsp://admin:***@cam/live and http://u:***@w/"
    assert redact_url("rtsp://viewer@cam/live, /dev/video0, rtsp://cam/p?a=b@c") == (
        "rtsp://viewer@cam/live, /dev/video0, rtsp://cam/p?a=b@c"
    )


@pytest.mark.parametrize(
    "camera, problem",
    [
        ('source = "picamera2"\nusername = "viewer"', "are for rtsp:// and http(s):// camera sources only"),
        ('source = "rtsp://a:b@cam/live"\nusername = "viewer"', "carries a login already"),
        ('source = "rtsp://cam/live"\npassword_file = "camera-password"', "password_file must be given with username"),
    ],
)
def test_camera_login_settings_are_checked(tmp_path, camera, problem):
    from agent.config.device import load_agent_config
    from agent.errors import ConfigError

    path = tmp_path / "agent.toml"
    path.write_text(
        f'[device]\nid = "cam-1"\nsite = "s"\nkind = "camera-box"\n[mqtt]\nhost = "b"\n[camera]\n{camera}\n'
    )
    with pytest.raises(ConfigError) as raised:
        load_agent_config(path)
    (line,) = raised.value.problems
    assert problem in line and "hunter" not in line and ":b@" not in line


def test_camera_password_file_that_is_missing_stops_the_start_with_one_line(site, capsys):
    camera = f'username = "{LOGIN[0]}"\npassword_file = "camera-password"'
    config = camera_box(site, "rtsp://127.0.0.1:9/live", camera=camera)
    assert main(["run", "--config", str(site.device_config_path("cam-1")), "--mock-pins"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    missing = config.secret_dirs[0] / "camera-password"
    assert line == f"error: camera.password_file: cannot read {missing}: No such file or directory"
