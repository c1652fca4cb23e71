"""Safe mode: a configuration that does not validate never leaves a call point without its buttons."""

import contextlib
import io
import json
import subprocess
import time

import pytest

from agent.cli import main
from agent.device.agent import Agent
from agent.device.config_files import ConfigFiles
from agent.device.control import request
from agent.device.safe_mode import load_for_start
from agent.errors import ConfigError
from hw.gpio import IndicatorState
from tests.conftest import agent_run_argv, wait_until

BUTTONS = (
    '[[buttons]]\nname = "help"\npin = 17\nlocation = "North gate"\n\n'
    '[[buttons]]\nname = "duress"\npin = 27\nalert_kind = "duress"\nsilent = true\n\n'
    "[tamper]\npin = 22\n\n"
    "[indicator]\nled_pin = 5\n"
)


def press(pin):
    pin.drive_low()
    pin.drive_high()
    time.sleep(0.04)  # past the bounce lockout


def break_file(site, device_id: str, extra: str) -> None:
    path = site.device_config_path(device_id)
    path.write_text(path.read_text() + extra)


def test_broken_file_without_last_good_starts_minimal_and_every_button_alerts(site, receiver, mock_factory):
    site.add_device("cp-1", body=BUTTONS)
    # Three mistakes: an interval out of range, a typo in one button, a rule for a camera the box has not.
    text = site.device_config_path("cp-1").read_text().replace('location = "North gate"', 'locaton = "North gate"')
    site.device_config_path("cp-1").write_text(text + "\n[telemetry]\ninterval_s = 1\n")
    starting = load_for_start(site.device_config_path("cp-1"))
    assert starting.source == "minimal"
    assert any("telemetry.interval_s = 1: Input should be greater than or equal to 5" in p for p in starting.safe_mode)
    assert any("buttons[0].locaton" in p and "did you mean 'location'?" in p for p in starting.safe_mode)
    assert [(b.name, b.pin) for b in starting.config.buttons] == [("help", 17), ("duress", 27)]
    assert starting.config.tamper is not None and starting.config.tamper.pin == 22
    with Agent(starting.config, pin_factory=mock_factory, starting=starting) as agent:
        assert agent.link.wait_connected(10)
        assert wait_until(lambda: agent.indicator_state() is IndicatorState.SAFE_MODE, 5)
        press(mock_factory.pin(17))
        press(mock_factory.pin(27))
        mock_factory.pin(22).drive_high()  # the enclosure is opened
        assert wait_until(lambda: len(receiver.store.messages(kind="alert")) == 2, 10)
        assert wait_until(lambda: receiver.store.messages(kind="tamper"), 10)
        assert wait_until(lambda: agent.delivery.stats.acknowledged >= 3, 10)
        assert agent.health()["safe_mode"].startswith("safe mode (minimal): ")
        assert "telemetry.interval_s" in request(agent.config.control_socket, "status")["safe_mode"]
        assert wait_until(lambda: _listed(site)["safe_mode"] == "yes", 10)  # the fleet view says so too
    faults = [m.claims["body"] for m in receiver.store.messages(kind="event") if m.claims["body"].get("fault")]
    assert faults[0]["fault"] == "config" and "telemetry.interval_s = 1" in faults[0]["message"]
    assert not ConfigFiles(starting.config.state_dir).last_good()  # a safe-mode run is never kept as good


def _listed(site) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["receiver", "devices", "--config", str(site.receiver_toml_path()), "--json"]) == 0
    (row,) = json.loads(out.getvalue())
    return row


def test_broken_file_starts_with_the_last_known_good_configuration(site, receiver, mock_factory):
    config = site.add_device("cp-1", body=BUTTONS)
    starting = load_for_start(site.device_config_path("cp-1"))
    assert starting.source == "file" and not starting.safe_mode
    with Agent(config, pin_factory=mock_factory, starting=starting):
        assert wait_until(lambda: ConfigFiles(config.state_dir).last_good() is not None, 10)
    break_file(site, "cp-1", "\n[[buttons]]\nname = 'help'\npin = 'nonsense'\n")
    starting = load_for_start(site.device_config_path("cp-1"))
    assert starting.source == "last-good"
    assert starting.config.model_dump() == config.model_dump()
    assert any("button names must be unique" in p or "buttons[2].pin" in p for p in starting.safe_mode)


def test_a_file_that_is_not_toml_uses_last_good_or_says_why_it_cannot_start(site, mock_factory):
    config = site.add_device("cp-1", body=BUTTONS)
    site.device_config_path("cp-1").write_text("[device\nid = ")
    with pytest.raises(ConfigError) as refused:
        load_for_start(site.device_config_path("cp-1"))
    assert "not valid TOML" in refused.value.problems[0]
    ConfigFiles(config.state_dir).save_last_good(config, 0)
    with pytest.raises(ConfigError):  # the default state directory holds no last-good: the file named another
        load_for_start(site.device_config_path("cp-1"))


def test_edge_agent_run_starts_in_safe_mode_and_says_so(site, receiver, verdicts, capsys):
    site.add_device("cp-1", body=BUTTONS)
    break_file(site, "cp-1", "\n[telemetry]\nintervl_s = 9\n")
    path = site.device_config_path("cp-1")
    agent = subprocess.Popen(
        agent_run_argv(path),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        socket = site.root / "cp-1" / "state" / "control.sock"
        assert wait_until(socket.exists, 30)
        assert wait_until(lambda: request(socket, "status").get("connected"), 20)
        status = request(socket, "status")
        assert status["indicator"] == "safe-mode" and "telemetry.intervl_s = 9: unknown key" in status["safe_mode"]
        assert wait_until(lambda: [v for v in verdicts.accepted("status") if "safe_mode" in v.claims.body], 10)
        capsys.readouterr()
        assert main(["status", "--config", str(path)]) == 0  # the operator's commands work in safe mode too
        assert '"indicator": "safe-mode"' in capsys.readouterr().out
        assert main(["test-alert", "--config", str(path)]) == 0
        assert wait_until(lambda: receiver.store.messages(kind="alert"), 10)
    finally:
        agent.terminate()
        _, stderr = agent.communicate(timeout=20)
    assert sum("agent.toml does not validate:" in line for line in stderr.splitlines()) == 1  # the errors, once
    assert "telemetry.intervl_s = 9: unknown key" in stderr
