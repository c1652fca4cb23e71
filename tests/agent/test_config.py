"""Configuration files: examples load, bad files are refused with the key path, the value and a hint."""

import os
from pathlib import Path

import pytest

from agent.cli import main
from agent.config.centre import load_receiver_config
from agent.config.device import load_agent_config
from agent.config.secrets import resolve_secret
from agent.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GOOD = """
[device]
id = "cp-1"
site = "oslo"
kind = "call-point"

[mqtt]
host = "broker.example"

[[buttons]]
name = "main"
pin = 17
"""


def problems_of(tmp_path, text: str) -> list[str]:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_agent_config(path)
    return caught.value.problems


@pytest.mark.parametrize("name", ["call-point.toml", "building-button.toml", "camera-box.toml"])
def test_example_device_configs_are_valid(name):
    config = load_agent_config(EXAMPLES / name)
    assert config.device.kind == name.removesuffix(".toml")


def test_example_receiver_config_is_valid():
    assert load_receiver_config(EXAMPLES / "receiver.toml").receiver.share_group == "centre"


def test_minimal_config_gets_safe_defaults(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(GOOD)
    config = load_agent_config(path)
    assert config.mqtt.port == 8883 and config.mqtt.tls.enabled
    assert config.mqtt.keepalive_s <= 30
    assert config.outbox.capacity >= 10_000
    assert config.buttons[0].activation == "press"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    (line,) = problems_of(tmp_path, GOOD.replace('host = "broker.example"', 'host = "b"\nkeepalive = 20'))
    assert line.endswith("agent.toml:9: mqtt.keepalive = 20: unknown key; did you mean 'keepalive_s'?")


def test_impossible_value_names_path_value_and_limit(tmp_path):
    (line,) = problems_of(tmp_path, GOOD.replace("pin = 17", "pin = 17\nhold_s = 60"))
    assert "buttons[0].hold_s = 60: Input should be less than or equal to 10" in line


def test_wrong_type_is_reported(tmp_path):
    (line,) = problems_of(tmp_path, GOOD.replace('host = "broker.example"', 'host = "b"\nport = "eighty"'))
    assert "mqtt.port = 'eighty': Input should be a valid integer" in line


def test_missing_required_key(tmp_path):
    (line,) = problems_of(tmp_path, GOOD.replace('site = "oslo"\n', ""))
    assert line.endswith("device.site: required key is missing")


def test_all_problems_are_reported_at_once(tmp_path):
    text = GOOD.replace('kind = "call-point"', 'kind = "lamp-post"').replace(
        "pin = 17", 'pin = 17\nactivation = "twice"'
    )
    lines = problems_of(tmp_path, text)
    assert len(lines) == 2
    assert "device.kind = 'lamp-post': Input should be 'call-point', 'building-button' or 'camera-box'" in lines[0]
    assert "buttons[0].activation = 'twice'" in lines[1]


def test_inline_password_is_refused_without_echoing_it(tmp_path):
    (line,) = problems_of(tmp_path, GOOD.replace('host = "broker.example"', 'host = "b"\npassword = "hunter2"'))
    assert "mqtt.password: secrets are not written in the config file" in line
    assert "hunter2" not in line


def test_cross_field_rules(tmp_path):
    text = GOOD + '\n[[buttons]]\nname = "main"\npin = "GPIO17"\n'
    (line,) = problems_of(tmp_path, text)
    assert "button names must be unique; repeated: main" in line
    no_buttons = GOOD.split("[[buttons]]")[0]
    (line,) = problems_of(tmp_path, no_buttons)
    assert "a call-point needs at least one [[buttons]] entry" in line
    shared_pin = GOOD + '\n[indicator]\nled_pin = "GPIO17"\n'
    (line,) = problems_of(tmp_path, shared_pin)
    assert "pin 'GPIO17' is used by both button 'main' and indicator.led_pin" in line


def test_password_file_needs_username(tmp_path):
    (line,) = problems_of(tmp_path, GOOD.replace('host = "broker.example"', 'host = "b"\npassword_file = "pw"'))
    assert "password_file must be given with username" in line


def test_not_toml_at_all(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[device\nid = ")
    with pytest.raises(ConfigError, match=r"agent.toml: not valid TOML: .*line 1"):
        load_agent_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_agent_config(tmp_path / "nope.toml")


def test_config_check_command_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(GOOD)
    bad.write_text(GOOD.replace("pin = 17", "pin = 17\nbounce_ms = -5"))
    assert main(["config", "check", str(good)]) == 0
    assert "valid (call-point oslo/cp-1)" in capsys.readouterr().out
    assert main(["config", "check", str(bad)]) == 2
    assert "buttons[0].bounce_ms = -5: Input should be greater than or equal to 0" in capsys.readouterr().err


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    path = tmp_path / "conf" / "agent.toml"
    path.parent.mkdir()
    path.write_text(GOOD.replace('kind = "call-point"', 'kind = "call-point"\nstate_dir = "state"'))
    assert load_agent_config(path).state_dir == (tmp_path / "conf" / "state").resolve()


def test_secrets_come_from_credentials_directory_first(tmp_path, monkeypatch):
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "device-key.pem").write_text("x")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    etc, state = tmp_path / "etc", tmp_path / "state"
    assert resolve_secret("device-key.pem", etc, state) == credentials / "device-key.pem"
    assert resolve_secret("other.pem", etc, state) == etc / "other.pem"  # where it would be created
    state.mkdir()
    (state / "other.pem").write_text("x")
    assert resolve_secret("other.pem", etc, state) == state / "other.pem"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert os.fspath(resolve_secret("device-key.pem", tmp_path)) == os.fspath(tmp_path / "device-key.pem")
