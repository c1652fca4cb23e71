"""The [[forward.arc]] section: what it accepts, and what it refuses with a message saying why."""

from __future__ import annotations

import pytest

from agent.config.centre import load_receiver_config
from agent.config.secrets import credential_files
from agent.errors import ConfigError

BASE = '[receiver]\nstate_dir = "."\n[mqtt]\nhost = "127.0.0.1"\n'
ARC = '[[forward.arc]]\nname = "arc-1"\nprimary = "arc.example.net:5000"\n'


def load(tmp_path, text: str):
    path = tmp_path / "receiver.toml"
    path.write_text(BASE + text)
    return load_receiver_config(path)


def test_accounts_by_device_then_site_then_default(tmp_path):
    config = load(
        tmp_path,
        ARC + 'default_account = "9999"\nkey_file = "arc.key"\n'
        '[[forward.arc.accounts]]\nsite = "s"\naccount = "1000"\n'
        '[[forward.arc.accounts]]\nsite = "s"\ndevice = "cp-7"\naccount = "1007"\nzone = 7\n',
    )
    (arc,) = config.forward.arc
    assert (arc.account_for("s", "cp-7").account, arc.account_for("s", "cp-7").zone) == ("1007", 7)
    assert arc.account_for("s", "cp-1").account == "1000"
    assert arc.account_for("elsewhere", "cp-1").account == "9999"
    assert ("forward.arc.arc-1.key_file", "arc.key") in credential_files(config)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (ARC + 'default_account = "12G4"\n', "default_account"),
        ('[[forward.arc]]\nname = "arc-1"\nprimary = "no-port"\n', "is not host:port"),
        (ARC + ARC, "ARC name(s) used twice: arc-1"),
        (ARC + "[forward.arc.codes]\ntest = 120\n", "test"),
        (ARC + "[forward.arc.codes]\nalert_kinds = { fire = 601 }\n", "is not an alarm code"),
        (ARC + "retry_first_s = 10\nretry_max_s = 1\n", "retry_max_s (1) is less than retry_first_s (10)"),
    ],
)
def test_impossible_settings_are_refused_with_the_reason(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(tmp_path, text)
