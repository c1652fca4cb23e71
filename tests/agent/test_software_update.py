"""Staged software updates on real parts: a real broker and receiver, ``edge-agent run`` as a real process,
a real wheel of this repository (version bumped) installed into a real venv, the real launcher and symlink."""

import base64
import hashlib
import shutil
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import __version__
from agent.centre.receiver import Receiver
from agent.centre.update_publish import staged
from agent.cli import main
from agent.device import software_update
from agent.device.agent import Agent
from agent.device.control import ControlError, request
from agent.device.software_update import SoftwareFiles
from agent.mqtt.link import MqttLink
from agent.protocol.enrolment import EnrolledDevice
from agent.protocol.messages import TopicLayout
from agent.protocol.signing import MessageSigner, generate_private_key, load_private_key
from agent.protocol.update_manifest import in_percentage, sign_manifest
from tests.conftest import REPO, agent_run_argv, wait_until
from tests.faultlab import Supervised

BUTTONS = '[[buttons]]\nname = "help"\npin = 17\nlocation = "North gate"\n'
NEW = "0.1.1"


def build_wheel(directory: Path, version: str, broken: bool = False) -> Path:
    """A wheel of this checkout (agent, hw, models) whose version is ``version``: what a release would ship.

    ``broken``: a release whose agent imports fine but crashes as it starts (every time).
    """
    name = f"edge_agent-{version}-py3-none-any.whl"
    info = f"edge_agent-{version}.dist-info"
    files: dict[str, bytes] = {}
    for package in ("agent", "hw", "models"):
        for path in sorted((REPO / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files[path.relative_to(REPO).as_posix()] = path.read_bytes()
    files["agent/__init__.py"] = files["agent/__init__.py"].replace(
        f'__version__ = "{__version__}"'.encode(), f'__version__ = "{version}"'.encode()
    )
    if broken:
        source = files["agent/device/agent.py"].decode()
        start = "        self.config = config\n"
        assert start in source
        files["agent/device/agent.py"] = source.replace(
            start, '        raise RuntimeError("broken release")\n' + start, 1
        ).encode()
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: edge-agent\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{info}/entry_points.txt"] = b"[console_scripts]\nedge-agent = agent.cli:main\n"
    record = [f"{path},sha256={_b64(hashlib.sha256(data).digest())},{len(data)}" for path, data in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    wheel = directory / name
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as out:
        for path, data in files.items():
            out.writestr(path, data)
    return wheel


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("artefact"), NEW)


def reports(store) -> list[dict]:
    return [
        m.claims["body"]["software_update"]
        for m in store.messages(kind="event")
        if "software_update" in m.claims["body"]
    ]


def publish(site, wheel: Path, *options: str) -> int:
    config = str(site.receiver_toml_path())
    return main(
        ["centre", "update", "publish", "--config", config, "--version", NEW, "--artefact", str(wheel), *options]
    )


def status(socket: Path) -> dict:
    try:
        return request(socket, "status")
    except ControlError:
        return {}  # between two versions, or not up yet


@pytest.fixture
def running_agent(site, tmp_path):
    """``edge-agent run`` as a real process under a supervisor (as systemd would run it)."""
    site.add_device("cp-1", body=BUTTONS)
    argv = agent_run_argv(site.device_config_path("cp-1"))
    process = Supervised("cp-1", argv, tmp_path / "cp-1.log")
    process.start()
    socket = site.root / "cp-1" / "state" / "control.sock"
    try:
        assert wait_until(lambda: status(socket).get("connected"), 30)
        yield SimpleNamespace(socket=socket, process=process)
    finally:
        process.stop()
        print((tmp_path / "cp-1.log").read_text()[-6000:], file=sys.stderr)  # shown when a test fails


def test_a_good_update_is_installed_beside_switched_to_and_reported(site, receiver, running_agent, wheel):
    assert publish(site, wheel, "--devices", "cp-1", "--gate", "30") == 0
    assert wait_until(lambda: reports(receiver.store), 120)
    (report,) = reports(receiver.store)
    assert report == {"outcome": "installed", "version": NEW, "from": __version__}
    files = SoftwareFiles(site.root / "cp-1" / "state")
    assert files.current.resolve() == files.venv(NEW).resolve() and files.trial() is None
    assert wait_until(lambda: status(running_agent.socket).get("version") == NEW, 10)  # the new venv's own code runs
    before = len(receiver.store.messages(kind="alert"))
    request(running_agent.socket, "test-alert")
    assert wait_until(lambda: len(receiver.store.messages(kind="alert")) == before + 1, 10)


def test_an_update_that_fails_its_gate_switches_back_and_the_outbox_is_intact(site, running_agent, verdicts, wheel):
    # No receiver: the alerts wait in the outbox, and nobody acknowledges the new version's test alert.
    queued = [request(running_agent.socket, "test-alert")["seq"] for _ in range(2)]
    assert publish(site, wheel, "--devices", "cp-1", "--gate", "5") == 0
    files = SoftwareFiles(site.root / "cp-1" / "state")
    assert wait_until(lambda: files.state()["handled"].get(NEW) == "rolled_back", 120)
    assert files.trial() is None and files.running_prefix() == Path(sys.prefix).resolve()
    assert wait_until(lambda: status(running_agent.socket).get("version") == __version__, 30)  # the version before runs
    with Receiver(site.receiver_config, on_verdict=verdicts) as receiver:
        assert wait_until(lambda: reports(receiver.store), 30)
        (report,) = reports(receiver.store)
        assert report["outcome"] == "rolled_back" and report["version"] == NEW and report["from"] == __version__
        assert "not acknowledged by the centre within 5 s" in report["reason"]
        delivered = lambda: {m.seq for m in receiver.store.messages(kind="alert")}  # noqa: E731
        assert wait_until(lambda: set(queued) <= delivered(), 30)  # queued before the update, delivered after
        assert wait_until(lambda: status(running_agent.socket).get("outbox_depth") == 0, 30)


def test_a_version_that_crashes_at_start_is_switched_back_by_the_launcher(site, running_agent, tmp_path):
    wheel = build_wheel(tmp_path, NEW, broken=True)
    process = running_agent.process
    assert publish(site, wheel, "--devices", "cp-1", "--gate", "30") == 0
    files = SoftwareFiles(site.root / "cp-1" / "state")
    while files.state()["handled"].get(NEW) != "rolled_back":  # systemd's Restart=always, here
        assert process.starts <= 2 + software_update.MAX_TRIAL_STARTS, "the launcher never switched back"
        assert wait_until(lambda: not process.is_running or files.state()["handled"].get(NEW), 60)
        if not process.is_running:
            process.start()
    assert files.trial() is None and files.running_prefix() == Path(sys.prefix).resolve()
    assert wait_until(lambda: status(running_agent.socket).get("version") == __version__, 30)
    with Receiver(site.receiver_config) as receiver:
        assert wait_until(lambda: reports(receiver.store), 30)
        (report,) = reports(receiver.store)
        assert report["outcome"] == "rolled_back" and "did not pass its health gate in 2 start(s)" in report["reason"]


@pytest.fixture
def agent(site, mock_factory):
    config = site.add_device("cp-1", body=BUTTONS)
    with Agent(config, pin_factory=mock_factory) as running:
        assert running.link.wait_subscribed(10)
        yield running


def test_forged_stale_expired_and_out_of_stage_manifests_are_refused(site, receiver, agent, wheel, monkeypatch):
    monkeypatch.setattr(software_update, "REFUSAL_REPORT_S", 0.0)
    config = site.receiver_config
    centre = MessageSigner(load_private_key(config.secret_dirs[0] / config.receiver.signing_key_file))
    impostor = MessageSigner(generate_private_key(site.root / "impostor.key"))
    data = wheel.read_bytes()
    fields = {
        "device": "cp-1",
        "site": site.site,
        "version": NEW,
        "url": wheel.as_uri(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "filename": wheel.name,
        "stage_devices": ["cp-1"],
    }
    cases = [
        (impostor, {}, 600, "bad_signature"),
        (centre, {"version": "0.0.9"}, 600, "stale"),
        (centre, {}, -60, "expired"),
        (centre, {"stage_devices": ["cp-2"]}, 600, "not_in_stage"),
        (centre, {"device": "cp-2"}, 600, "device_mismatch"),
        (centre, {"min_config_schema": 2}, 600, "config_schema"),
        (centre, {}, 600, "unsupported"),  # all checks passed: this agent (in a test) cannot restart itself
        (centre, {"sha256": "0" * 64}, 600, "artefact_sha256"),  # as if it could: the download is checked
        (centre, {"size": len(data) - 1}, 600, "artefact_size"),
        (centre, {}, 600, "disk_space"),  # with the space an update must leave free raised past this disk's
    ]
    topic = TopicLayout(site.prefix).topic(site.site, "cp-1", "update")
    link = MqttLink(config.mqtt, client_id="test-publisher", secret_dirs=config.secret_dirs)
    assert link.probe(10) is None
    try:
        for n, (signer, change, lifetime, reason) in enumerate(cases, start=1):
            agent.restartable = reason.startswith(("artefact", "disk"))
            if reason == "disk_space":
                monkeypatch.setattr(software_update, "KEEP_FREE_BYTES", shutil.disk_usage(site.root).free + 1)
            token = sign_manifest(signer, now=time.time(), expires_in_s=lifetime, **{**fields, **change})
            link.publish(topic, token.encode(), qos=1, retain=True)
            assert wait_until(lambda n=n: len(reports(receiver.store)) == n, 20), reason
            refused = reports(receiver.store)[-1]
            assert refused["outcome"] == "refused" and refused["reason"].startswith(reason), refused
    finally:
        link.close()
    files = SoftwareFiles(agent.config.state_dir)
    assert not files.current.exists() and not list(files.versions.glob("*/*"))  # nothing kept, installed or switched


def test_a_stage_is_a_stable_share_of_the_fleet_or_a_list():
    fleet = [EnrolledDevice(f"cp-{n}", "s1", "call-point", "", None) for n in range(1000)]
    quarter = staged(fleet, 25, None)
    assert 180 < len(quarter) < 320 and quarter == staged(fleet, 25, None)  # the same devices every time
    assert {d.device_id for d in quarter} <= {d.device_id for d in staged(fleet, 50, None)}  # stages grow
    assert all(in_percentage(d.device_id, 25) for d in quarter)
    assert [d.device_id for d in staged(fleet, None, ["cp-7", "cp-9"])] == ["cp-7", "cp-9"]
