"""The centre learns when a device or its path dies; systemd learns when the agent itself is stuck."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agent.centre.receiver import Receiver
from agent.cli import main
from agent.config.centre import load_receiver_config
from agent.device.agent import Agent
from tests.conftest import REPO, agent_run_argv, wait_until


def test_silent_device_is_reported_missing_within_its_supervision_interval(site, mock_factory, capsys):
    site.add_device("cp-hb", body='[[buttons]]\nname = "help"\npin = 17\n[telemetry]\ninterval_s = 5\n')
    path = site.receiver_toml_path()
    path.write_text(
        path.read_text().replace(
            'credentials_dir = "credentials"', 'credentials_dir = "credentials"\nsupervision_s = 12'
        )
    )
    events = []
    with Receiver(load_receiver_config(path), on_device_event=events.append) as receiver:
        agent = subprocess.Popen(
            agent_run_argv(site.device_config_path("cp-hb")),
            stderr=subprocess.DEVNULL,
        )
        try:
            assert wait_until(lambda: receiver.store.messages(kind="telemetry"), 20)
            time.sleep(6)  # a second heartbeat while it lives: not missing
            assert events == []
        finally:
            agent.kill()  # the power is cut: no goodbye, no more heartbeats
            agent.wait()
        silent_since = time.monotonic()
        assert wait_until(lambda: [e for e in events if e.event == "missing"], 20)
        assert time.monotonic() - silent_since <= 12 + 2
        (missing,) = events
        assert (missing.device, missing.site) == ("cp-hb", "demo-site") and "supervision 12 s" in missing.detail
        assert main(["receiver", "devices", "--config", str(path), "--json"]) == 0
        (row,) = [r for r in json.loads(capsys.readouterr().out) if r["device"] == "cp-hb"]
        assert row["state"] == "missing"
        with Agent(site.add_device("cp-new"), pin_factory=mock_factory):  # another device appears and is listed
            assert wait_until(
                lambda: any(s.device == "cp-new" and s.status == "online" for s in receiver.registry.states()), 10
            )
        assert main(["receiver", "devices", "--config", str(path)]) == 0
        table = capsys.readouterr().out
        assert re.search(r"demo-site\s+cp-hb\s+call-point\s+missing", table)


def test_watchdog_pings_only_while_the_alert_path_is_healthy(site, receiver, mock_factory, tmp_path, monkeypatch):
    notify_path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(notify_path))
    systemd.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    monkeypatch.setenv("WATCHDOG_USEC", "600000")  # WatchdogSec=0.6: ping every 0.3 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    def messages_for(seconds):
        got, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                got.append(systemd.recv(4096).decode())
            except TimeoutError:
                pass
        return got

    def messages_until(wanted, timeout):
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline and not any(wanted(m) for m in got):
            try:
                got.append(systemd.recv(4096).decode())
            except TimeoutError:
                pass
        return got

    def says_outbox_stuck(message):
        return message.startswith("STATUS=unhealthy") and "outbox not responding" in message

    config = site.add_device("cp-wd")
    with Agent(config, pin_factory=mock_factory) as agent:
        first = messages_for(1.5)
        assert first[0].startswith("READY=1") and first.count("WATCHDOG=1") >= 3
        with agent.outbox._lock:  # the outbox (and so the delivery thread) is stuck
            noticed = messages_until(says_outbox_stuck, 10)
            stuck = messages_for(2.0)  # still stuck after systemd was told
        assert any(says_outbox_stuck(m) for m in noticed), noticed
        assert "WATCHDOG=1" not in stuck
        recovered = messages_for(2.0)
        assert "WATCHDOG=1" in recovered
    systemd.close()


UNITS = ["edge-agent.service", "edge-agent-receiver.service"]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_files_verify_and_are_hardened(unit, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    text = (REPO / "systemd" / unit).read_text()
    executable = shutil.which("edge-agent") or str(Path(os.sys.executable).with_name("edge-agent"))
    local = tmp_path / unit
    local.write_text(text.replace("/opt/edge-agent/bin/edge-agent", executable))
    verify = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(local)], capture_output=True, text=True
    )
    exposure = float(re.search(r"Overall exposure level for .*: (\d+\.\d+)", security.stdout).group(1))
    assert exposure <= 2.5, security.stdout[-2000:]
    assert "Type=notify" in text and "Restart=always" in text and "WatchdogSec=" in text
