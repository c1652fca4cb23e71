"""The install as installed: the service user gets its credentials only through systemd, failures are one line.

The agent is run as an unprivileged user (as ``User=edge-agent`` does) against a root-only credentials
directory, with ``$CREDENTIALS_DIRECTORY`` filled the way systemd fills it from the drop-in that
``provision`` writes; databases and evidence are private whatever the umask.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from agent.centre.store import ReceiverStore
from agent.cli import main
from agent.config.centre import load_receiver_config
from agent.config.device import load_agent_config
from agent.config.secrets import credential_files
from agent.device.outbox import Outbox
from agent.protocol.messages import new_claims
from agent.protocol.signing import generate_private_key, public_jwk
from tests.agent.test_tls import _issue
from tests.conftest import REPO, wait_until

SERVICE_UID = 65534  # nobody: a user that, like edge-agent, cannot read the root-only credentials


@pytest.fixture
def world(tmp_path):
    """A directory every user may traverse (pytest's own tmp_path is root-only)."""
    directory = Path(tempfile.mkdtemp(prefix="edge-install-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pki(tmp_path):
    directory = tmp_path / "pki"
    directory.mkdir()
    directory.chmod(0o755)
    tmp_path.chmod(0o755)
    ca_key, ca = _issue(directory, "ca", "Test Centre CA", ca=True)
    _issue(directory, "server", "127.0.0.1", ca_key, ca.subject, server=True)
    _issue(directory, "client", "cp-42", ca_key, ca.subject)
    return directory


def provision(root: Path, pki: Path, port: int, capsys, *extra: str) -> Path:
    """``edge-agent provision`` with mutual TLS, as the README has it; returns the config path."""
    centre = root.parent / "centre.jwk"
    centre.write_text(json.dumps(public_jwk(generate_private_key(root.parent / "centre-key.pem", force=True))))
    args = ["provision", "--device-id", "cp-42", "--site", "oslo", "--kind", "call-point"]
    args += ["--broker", f"mqtts://127.0.0.1:{port}", "--centre-key", str(centre), "--root", str(root), "--no-qr"]
    args += ["--ca-file", str(pki / "ca.pem"), "--cert-file", str(pki / "client.pem")]
    args += ["--key-file", str(pki / "client-key.pem"), *extra]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    return root / "etc/edge-agent/agent.toml"


def load_credentials_as_systemd(dropin: Path, target: Path, uid: int, only: set[str] | None = None) -> None:
    """What systemd does with the drop-in's LoadCredential=ID:PATH lines: private copies for the service user."""
    target.mkdir()
    for line in dropin.read_text().splitlines():
        if line.startswith("LoadCredential="):
            name, source = line.removeprefix("LoadCredential=").split(":", 1)
            if only is None or name in only:
                shutil.copyfile(source, target / name)
                os.chown(target / name, uid, uid)
                (target / name).chmod(0o400)
    os.chown(target, uid, uid)
    target.chmod(0o500)


def service_python() -> str:
    """This interpreter, or the system's of the same version when the service user cannot run this one."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/python{version}"):
        probe = [candidate, "-s", "-c", f"import sys; assert sys.version.startswith('{version}')"]
        try:
            if subprocess.run(probe, user=SERVICE_UID, cwd="/", capture_output=True).returncode == 0:
                return candidate
        except OSError:
            continue
    pytest.skip(f"no Python {version} the service user may run")


def run_as_service_user(config: Path, log: Path, credentials: Path | None) -> subprocess.Popen:
    packages = sysconfig.get_paths()["purelib"]  # this environment's packages, readable by everyone
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{REPO}:{packages}"}
    if credentials is not None:
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
    command = [service_python(), "-s", "-m", "agent.cli", "run", "--config", str(config), "--mock-pins"]
    with log.open("w") as stderr:
        return subprocess.Popen(
            command, env=env, cwd="/", user=SERVICE_UID, group=SERVICE_UID, extra_groups=[], stderr=stderr
        )


def test_service_user_connects_over_tls_with_credentials_from_systemd_only(world, pki, tls_broker, capsys):
    if os.geteuid() != 0:
        pytest.skip("running the agent as another user (as systemd does) needs root")
    root = world / "root"
    config_path = provision(root, pki, tls_broker.port, capsys)
    config = load_agent_config(config_path)
    assert (config.mqtt.tls.ca_file, config.mqtt.tls.cert_file) == ("broker-ca.pem", "client-cert.pem")
    assert stat.S_IMODE(config.device.credentials_dir.stat().st_mode) == 0o700
    os.chown(config.state_dir, SERVICE_UID, SERVICE_UID)  # systemd's StateDirectory=
    dropin = root / "etc/systemd/system/edge-agent.service.d/credentials.conf"

    # Without systemd's copies the service user cannot read the root-only directory: one line, no traceback.
    agent = run_as_service_user(config_path, world / "no-credentials.log", None)
    assert agent.wait(30) == 2
    (line,) = (world / "no-credentials.log").read_text().splitlines()
    assert line.startswith(f"error: identity.private_key_file: cannot read {config.device.credentials_dir}/")
    assert "device-key.pem: Permission denied" in line

    # A unit that passes in the keys but not the TLS files (the old unit) fails naming the TLS setting.
    load_credentials_as_systemd(dropin, world / "keys-only", SERVICE_UID, only={"device-key.pem", "centre.jwk"})
    agent = run_as_service_user(config_path, world / "keys-only.log", world / "keys-only")
    assert agent.wait(30) == 2
    (line,) = (world / "keys-only.log").read_text().splitlines()
    assert line.startswith("error: mqtt.tls.ca_file: cannot read ") and "broker-ca.pem: Permission denied" in line

    # With the drop-in's credentials, relative TLS names resolve in $CREDENTIALS_DIRECTORY: mutual TLS connects.
    load_credentials_as_systemd(dropin, world / "credentials", SERVICE_UID)
    log = world / "agent.log"
    agent = run_as_service_user(config_path, log, world / "credentials")
    try:
        assert wait_until(lambda: f"connected to 127.0.0.1:{tls_broker.port}" in log.read_text(), 30), log.read_text()
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_provision_writes_a_dropin_for_the_credentials_that_exist(world, pki, capsys):
    root = world / "root"
    config_path = provision(root, pki, 8883, capsys)
    credentials = root / "etc/edge-agent/credentials"
    dropin = root / "etc/systemd/system/edge-agent.service.d/credentials.conf"
    lines = [line for line in dropin.read_text().splitlines() if line.startswith("LoadCredential=")]
    assert lines == [
        f"LoadCredential={name}:{credentials}/{name}"
        for name in ("device-key.pem", "centre.jwk", "broker-ca.pem", "client-cert.pem", "client-cert-key.pem")
    ]  # no mqtt-password: none was given, and a missing LoadCredential= file would fail the unit
    assert stat.S_IMODE((credentials / "client-cert-key.pem").stat().st_mode) == 0o600

    # Adding a password later: the command writes the drop-in again, now with it.
    text = config_path.read_text().replace(
        "[mqtt.tls]", 'username = "cp-42"\npassword_file = "mqtt-password"\n\n[mqtt.tls]'
    )
    config_path.write_text(text)
    assert main(["config", "credentials", str(config_path), "--unit-dir", str(root / "etc/systemd/system")]) == 0
    assert "not passed in: mqtt.password_file = 'mqtt-password': not in" in capsys.readouterr().err
    (credentials / "mqtt-password").write_text("secret\n")
    assert main(["config", "credentials", str(config_path), "--unit-dir", str(root / "etc/systemd/system")]) == 0
    assert "mqtt-password" in capsys.readouterr().out
    assert f"LoadCredential=mqtt-password:{credentials}/mqtt-password" in dropin.read_text()


def test_credential_settings_are_every_file_setting(tmp_path):
    path = tmp_path / "receiver.toml"
    path.write_text(
        '[receiver]\nstate_dir = "s"\n[mqtt]\nhost = "b"\nusername = "c"\npassword_file = "receiver-mqtt-password"\n'
        '[mqtt.tls]\nca_file = "/etc/ssl/ca.pem"\ncert_file = "c.pem"\nkey_file = "k.pem"\n'
    )
    found = dict(credential_files(load_receiver_config(path)))
    assert found["mqtt.password_file"] == "receiver-mqtt-password"
    assert found["receiver.signing_key_file"] == "centre-key.pem"
    assert (found["mqtt.tls.cert_file"], found["mqtt.tls.key_file"]) == ("c.pem", "k.pem")
    assert "mqtt.tls.ca_file" not in found  # absolute: read where it is, not passed in


@pytest.mark.parametrize("unit", ["edge-agent.service", "edge-agent-receiver.service"])
def test_units_with_their_credentials_dropin_verify_clean(unit, world, pki, capsys):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    units = world / "units"
    units.mkdir()
    executable = str(Path(sys.executable).with_name("edge-agent"))
    (units / unit).write_text(
        (REPO / "systemd" / unit).read_text().replace("/opt/edge-agent/bin/edge-agent", executable)
    )
    if unit == "edge-agent.service":
        config_path = provision(world / "root", pki, 8883, capsys)
        args = ["config", "credentials", str(config_path)]
    else:
        config_path = world / "receiver.toml"
        config_path.write_text(
            f'[receiver]\nstate_dir = "{world}/state"\ncredentials_dir = "{world}/credentials"\n'
            '[mqtt]\nhost = "b"\nusername = "centre"\npassword_file = "receiver-mqtt-password"\n'
        )
        (world / "credentials").mkdir(mode=0o700)
        generate_private_key(world / "credentials/centre-key.pem")
        args = ["config", "credentials", str(config_path), "--receiver"]
    assert main([*args, "--unit-dir", str(units)]) == 0
    dropin = (units / f"{unit}.d" / "credentials.conf").read_text()
    assert "centre-key.pem" in dropin or "device-key.pem" in dropin
    assert "mqtt-password" not in dropin  # named in the config, but absent: left out, not a failing unit
    verify = subprocess.run(["systemd-analyze", "verify", str(units / unit)], capture_output=True, text=True)
    assert (verify.returncode, verify.stderr.strip()) == (0, "")


def test_vision_may_lower_its_priority_under_the_units_system_call_filter():
    text = (REPO / "systemd/edge-agent.service").read_text()
    filters = re.findall(r"^SystemCallFilter=(.*)$", text, re.MULTILINE)
    assert filters == ["@system-service", "~@privileged @resources", "setpriority"]  # allowed again, after the deny


@pytest.mark.parametrize(
    "spoil, setting",
    [
        ("broker-ca.pem", "mqtt.tls.ca_file"),
        ("client-cert.pem", "mqtt.tls.cert_file"),
        ("client-cert-key.pem", "mqtt.tls.key_file"),
        ("mqtt-password", "mqtt.password_file"),
        ("centre.jwk", "identity.centre_key_file"),
        ("device-key.pem", "identity.private_key_file"),
    ],
)
@pytest.mark.parametrize("how", ["missing", "a directory"])
def test_a_credential_that_cannot_be_read_is_one_line_naming_it(spoil, setting, how, world, pki, capsys):
    password = world / "password"
    password.write_text("secret\n")
    config_path = provision(world / "root", pki, 8883, capsys, "--username", "cp-42", "--password-file", str(password))
    target = world / "root/etc/edge-agent/credentials" / spoil
    target.unlink()
    if how == "a directory":
        target.mkdir()
    assert main(["run", "--config", str(config_path), "--mock-pins"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    reason = "No such file or directory" if how == "missing" else "Is a directory"
    assert line == f"error: {setting}: cannot read {target}: {reason}"


def test_a_ca_file_that_is_not_pem_is_one_line(world, pki, capsys):
    config_path = provision(world / "root", pki, 8883, capsys)
    ca = world / "root/etc/edge-agent/credentials/broker-ca.pem"
    ca.write_text("not a certificate\n")
    assert main(["run", "--config", str(config_path), "--mock-pins"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: mqtt.tls.ca_file: {ca} is not a PEM CA bundle: ")


def alert(seq: int) -> dict:
    return new_claims(device="cp-1", site="oslo", seq=seq, kind="alert", body={})


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_databases_and_evidence_are_private_whatever_the_umask(umask, tmp_path):
    pytest.importorskip("cv2")
    import numpy as np

    from agent.vision.evidence import EvidenceStore
    from agent.vision.redaction import Redactor
    from tests.agent.vision.scenes import face_model_dir

    redactor = Redactor.load("blazeface-full-range", face_model_dir())
    old = os.umask(umask)
    try:
        with Outbox(tmp_path / "outbox.sqlite") as outbox:
            outbox.add("alert", True, alert)
            with ReceiverStore(tmp_path / "receiver.sqlite") as store:
                store.insert(alert(1), 0.0)
                evidence = EvidenceStore(tmp_path / "evidence", 3600, redactor)
                evidence.save(np.zeros((48, 64, 3), np.uint8), [], "e1")
                files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
                modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    finally:
        os.umask(old)
    for database in ("outbox.sqlite", "receiver.sqlite"):
        for suffix in ("", "-wal", "-shm"):
            assert modes.pop(database + suffix) == "0o600", database + suffix
    assert modes == {"e1.jpg": "0o600", "outbox.sqlite.seq": "0o600"}  # the sequence floor, too
    assert oct(stat.S_IMODE((tmp_path / "evidence").stat().st_mode)) == "0o700"


def test_a_database_left_readable_by_an_older_version_is_made_private(tmp_path):
    path = tmp_path / "outbox.sqlite"
    with Outbox(path) as outbox:
        outbox.add("alert", True, alert)
    path.chmod(0o644)
    with Outbox(path) as outbox:
        assert outbox.depth() == 1
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
