"""``edge-agent centre user add``: accounts from the command line, argon2-hashed, never from argv."""

from __future__ import annotations

import pytest

from agent.centre.store import open_store
from agent.cli import main
from agent.console.state import ConsoleState


def test_user_add_hashes_the_password_from_a_file_and_refuses_a_second_account_of_that_name(site, tmp_path, capsys):
    secret = tmp_path / "pw"
    secret.write_text("a long enough password\n")
    config = str(site.receiver_toml_path())
    assert (
        main(
            ["centre", "user", "add", "ana", "--role", "supervisor", "--config", config, "--password-file", str(secret)]
        )
        == 0
    )
    assert "added supervisor ana" in capsys.readouterr().out
    with open_store(site.receiver_config) as store:
        stored, role = ConsoleState(store).operator("ana")
        (entry,) = ConsoleState(store).audit_log()
    assert stored.startswith("$argon2id$") and "long enough" not in stored and role == "supervisor"
    assert (entry.actor, entry.action, entry.detail) == ("command-line", "account-add", "ana (supervisor)")
    assert main(["centre", "user", "add", "ana", "--config", config, "--password-file", str(secret)]) == 2
    assert "give --replace" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "password", "problem"),
    [("ana", "short", "at least 10 characters"), ("../ana", "a long enough password", "a name is 1-64")],
)
def test_user_add_refuses_weak_passwords_and_odd_names(site, tmp_path, capsys, name, password, problem):
    secret = tmp_path / "pw"
    secret.write_text(password)
    argv = ["centre", "user", "add", name, "--config", str(site.receiver_toml_path()), "--password-file", str(secret)]
    assert main(argv) == 2
    assert problem in capsys.readouterr().err


def test_the_console_command_serves_on_its_address_and_stops_cleanly_on_sigterm(site):
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    from tests.conftest import REPO, wait_until

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "agent.cli", "centre", "console", "--config", str(site.receiver_toml_path())]
    process = subprocess.Popen([*argv, "--listen", f"127.0.0.1:{port}"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:

        def serving() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/login", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(serving, 30, interval=0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
