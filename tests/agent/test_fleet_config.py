"""Pushed configuration on real parts: a real broker, a real receiver, agents on mock pins, the real CLI."""

import json
import subprocess
import sys
import time

import pytest

from agent.centre.receiver import Receiver
from agent.cli import main
from agent.device import config_update
from agent.device.agent import Agent
from agent.device.config_files import ConfigFiles
from agent.device.control import request
from agent.device.safe_mode import load_for_start
from agent.errors import ControlError
from agent.mqtt.link import MqttLink
from agent.protocol.config_doc import sign_document
from agent.protocol.messages import TopicLayout
from agent.protocol.signing import MessageSigner, generate_private_key, load_private_key
from tests.conftest import agent_run_argv, wait_until

BUTTONS = '[[buttons]]\nname = "help"\npin = 17\nlocation = "North gate"\n\n[indicator]\nled_pin = 5\n'


def press(pin):
    pin.drive_low()
    pin.drive_high()
    time.sleep(0.04)  # past the bounce lockout


def outcomes(store) -> list[dict]:
    """The config_update reports the centre stored, in order."""
    return [
        m.claims["body"]["config_update"] for m in store.messages(kind="event") if "config_update" in m.claims["body"]
    ]


def push(site, tmp_path, text: str, *options: str) -> int:
    document = tmp_path / f"push-{time.monotonic_ns()}.toml"
    document.write_text(text)
    return main(["centre", "config", "push", "--config", str(site.receiver_toml_path()), *options, str(document)])


@pytest.fixture
def agent(site, mock_factory):
    site.add_device("cp-1", body=BUTTONS)
    starting = load_for_start(site.device_config_path("cp-1"))
    with Agent(starting.config, pin_factory=mock_factory, starting=starting) as running:
        assert running.link.wait_subscribed(10)
        yield running


def centre_signer(site) -> MessageSigner:
    config = site.receiver_config
    return MessageSigner(load_private_key(config.secret_dirs[0] / config.receiver.signing_key_file))


def publish_retained(site, topic: str, token: str) -> None:
    link = MqttLink(site.receiver_config.mqtt, client_id="test-publisher", secret_dirs=site.receiver_config.secret_dirs)
    assert link.probe(10) is None
    try:
        link.publish(topic, token.encode(), qos=1, retain=True)
        time.sleep(0.2)  # let paho flush the packet before the link goes
    finally:
        link.close()


def test_a_pushed_interval_takes_effect_and_becomes_last_known_good(site, receiver, agent, tmp_path, capsys):
    assert agent.config.telemetry.interval_s == 30
    assert push(site, tmp_path, "[telemetry]\ninterval_s = 5\n", "--device", "cp-1") == 0
    version = int(capsys.readouterr().out.split("as version ")[1].split()[0])
    assert wait_until(lambda: outcomes(receiver.store), 30)
    (report,) = outcomes(receiver.store)
    assert report["outcome"] == "applied" and report["version"] == version and report["changed"] == ["telemetry"]
    assert agent.config.telemetry.interval_s == 5 and agent.config_version == version
    before = len(receiver.store.messages(kind="telemetry"))
    assert wait_until(lambda: len(receiver.store.messages(kind="telemetry")) >= before + 2, 15)  # every 5 s now
    files = ConfigFiles(agent.config.state_dir)
    assert files.last_good().version == version and files.pushed().overlay == {"telemetry": {"interval_s": 5}}
    assert load_for_start(site.device_config_path("cp-1")).config.telemetry.interval_s == 5  # after a restart too
    assert wait_until(lambda: _listed(site, capsys).get("config_version") == version, 15)
    assert _listed(site, capsys)["safe_mode"] == "no"


def _listed(site, capsys) -> dict:
    capsys.readouterr()
    assert main(["receiver", "devices", "--config", str(site.receiver_toml_path()), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    return row


def test_an_invalid_push_is_rejected_with_the_validation_errors_at_the_centre(site, receiver, agent, tmp_path):
    assert (
        push(site, tmp_path, "[telemetry]\ninterval_s = 1\n\n[indicator]\nack_display_s = 0\n", "--site", "demo-site")
        == 0
    )
    assert wait_until(lambda: outcomes(receiver.store), 20)
    (report,) = outcomes(receiver.store)
    assert report["outcome"] == "rejected" and report["selector"] == "site:demo-site"
    assert any("telemetry.interval_s = 1: Input should be greater than or equal to 5" in e for e in report["errors"])
    assert any("indicator.ack_display_s = 0" in e for e in report["errors"])
    assert agent.config.telemetry.interval_s == 30 and agent.config_version == 0


def test_secrets_and_local_settings_are_refused_before_anything_is_signed(site, receiver, agent, tmp_path, capsys):
    text = '[mqtt]\npassword_file = "stolen"\n\n[identity]\ncentre_key_file = "evil.jwk"\n\n[device]\nid = "cp-9"\n'
    assert push(site, tmp_path, text, "--device", "cp-1") == 2
    errors = capsys.readouterr().err
    assert "mqtt.password_file: secrets and secret files are never pushed" in errors
    assert "identity: set on the device by its installer; a push may not change it" in errors
    assert "device.id: set on the device by its installer; a push may not change it" in errors
    assert push(site, tmp_path, "[telemetry]\ninterval_s = 10\n", "--device", "cp-404") == 2


def test_a_push_whose_test_alert_is_not_acknowledged_is_rolled_back(site, agent, verdicts, tmp_path):
    # No receiver: the broker takes the gate's test alert, nobody acknowledges it within the gate.
    assert push(site, tmp_path, "[telemetry]\ninterval_s = 6\n", "--device", "cp-1", "--gate", "5") == 0
    assert wait_until(lambda: agent.config_updater.counters["rolled_back"] == 1, 30)
    assert agent.config.telemetry.interval_s == 30 and agent.config_version == 0
    assert ConfigFiles(agent.config.state_dir).pushed().overlay == {}
    with Receiver(site.receiver_config, on_verdict=verdicts) as receiver:  # the centre is back: the report arrives
        assert wait_until(lambda: outcomes(receiver.store), 20)
        (report,) = outcomes(receiver.store)
    assert report["outcome"] == "rolled_back"
    assert "not acknowledged by the centre within 5 s" in report["reason"]


def test_no_change_lands_while_an_alert_is_unacknowledged(site, agent, verdicts, mock_factory, tmp_path):
    press(mock_factory.pin(17))  # no receiver yet: the alert stays unacknowledged
    assert wait_until(lambda: agent.delivery.stats.published >= 1, 10)
    assert push(site, tmp_path, "[telemetry]\ninterval_s = 7\n", "--device", "cp-1") == 0
    assert wait_until(lambda: "unacknowledged" in agent.config_updater.state, 10)
    time.sleep(1.0)  # deliberate: the change must still not have landed a while later
    assert agent.config.telemetry.interval_s == 30
    with Receiver(site.receiver_config, on_verdict=verdicts) as receiver:
        assert wait_until(lambda: [r for r in outcomes(receiver.store) if r["outcome"] == "applied"], 30)
    assert agent.config.telemetry.interval_s == 7


def test_forged_stale_replayed_expired_and_misaddressed_pushes_are_refused(
    site, receiver, agent, tmp_path, monkeypatch
):
    monkeypatch.setattr(config_update, "REFUSAL_REPORT_S", 0.0)  # each refusal reported: this test reads them all
    topic = TopicLayout(site.prefix).topic(site.site, "cp-1", "config")
    centre = centre_signer(site)
    overlay = {"telemetry": {"interval_s": 10}}

    def signed(version: int, signer=centre, config=overlay, device="cp-1", **change) -> str:
        """A push to cp-1 by the centre unless the case says otherwise."""
        fields = {"device": device, "site": site.site, "selector": f"device:{device}", "expires_in_s": 600}
        return sign_document(signer, config, version=version, **{**fields, **change})

    older, newer = signed(5), signed(9)
    publish_retained(site, topic, newer)
    assert wait_until(lambda: [r for r in outcomes(receiver.store) if r["outcome"] == "applied"], 30)
    impostor = MessageSigner(generate_private_key(tmp_path / "impostor.pem"))
    cases = [
        (older, "stale: version 5 is older than version 9"),  # a replay of an older, genuine push
        (signed(99, signer=impostor), "bad_signature"),
        (signed(20, expires_in_s=60, now=time.time() - 3600), "expired"),
        (signed(21, device="cp-2"), "device_mismatch"),
        (signed(22, selector="group:camera-box"), "device_mismatch"),
        (signed(23, config={"mqtt": {"password_file": "x"}}), "refused_setting"),
    ]
    for n, (token, reason) in enumerate(cases, start=1):
        publish_retained(site, topic, token)
        assert wait_until(lambda n=n: len([r for r in outcomes(receiver.store) if r["outcome"] == "refused"]) == n, 20)
        refused = [r for r in outcomes(receiver.store) if r["outcome"] == "refused"][-1]
        assert refused["reason"].startswith(reason), refused
    publish_retained(site, topic, newer)  # the push in force, seen again (a reconnect): nothing happens
    time.sleep(1.0)  # deliberate: nothing more may arrive
    assert len(outcomes(receiver.store)) == 1 + len(cases)
    assert agent.config_version == 9
    monkeypatch.setattr(config_update, "REFUSAL_REPORT_S", 60.0)
    for n in range(3):  # junk on the topic: counted and logged, but it never floods the centre
        publish_retained(site, topic, f"junk-{n}")
    assert wait_until(lambda: agent.config_updater.counters["refused_unreported"] == 3, 10)
    assert len(outcomes(receiver.store)) == 1 + len(cases)


@pytest.fixture
def running_agent(site):
    """``edge-agent run`` as a real process (it restarts itself for a pushed change that needs it)."""
    site.add_device("cp-1", body=BUTTONS)
    command = agent_run_argv(site.device_config_path("cp-1"))
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    socket = site.root / "cp-1" / "state" / "control.sock"
    try:
        assert wait_until(lambda: _status(socket).get("connected"), 30)
        yield socket
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
        print(stderr, file=sys.stderr)  # shown when a test fails


def _status(socket) -> dict:
    try:
        return request(socket, "status")
    except ControlError:
        return {}  # between two runs of the agent (a restart), or not up yet


def test_a_change_that_needs_a_restart_is_tried_after_one_and_kept(site, receiver, running_agent, tmp_path, capsys):
    moved = '[[buttons]]\nname = "help"\npin = 17\nlocation = "South gate"\n'
    assert push(site, tmp_path, moved, "--device", "cp-1") == 0
    version = int(capsys.readouterr().out.split("as version ")[1].split()[0])
    assert wait_until(lambda: outcomes(receiver.store), 60)
    (report,) = outcomes(receiver.store)
    assert report == {"outcome": "applied", "version": version, "selector": "device:cp-1", "changed": ["restart"]}
    assert wait_until(lambda: _status(running_agent).get("config_version") == version, 10)
    request(running_agent, "test-alert")
    assert wait_until(lambda: len(receiver.store.messages(kind="alert")) == 2, 10)  # the gate's, then this one
    assert receiver.store.messages(kind="alert")[-1].claims["body"]["location"] == "South gate"


def test_a_restarted_change_that_fails_its_gate_restarts_on_the_one_before(site, running_agent, verdicts, tmp_path):
    moved = '[[buttons]]\nname = "help"\npin = 17\nlocation = "Nowhere"\n'
    assert push(site, tmp_path, moved, "--device", "cp-1", "--gate", "5") == 0  # no receiver: no acknowledgement
    files = ConfigFiles(site.root / "cp-1" / "state")
    assert wait_until(lambda: files.pushed().handled > 0 and files.trial() is None, 60)  # judged: rolled back
    assert wait_until(lambda: _status(running_agent).get("config_version") == 0, 30)  # restarted on the one before
    with Receiver(site.receiver_config, on_verdict=verdicts) as receiver:
        assert wait_until(lambda: outcomes(receiver.store), 20)
        (report,) = outcomes(receiver.store)
        assert report["outcome"] == "rolled_back" and "not acknowledged by the centre within 5 s" in report["reason"]
        request(running_agent, "test-alert")
        assert wait_until(
            lambda: [m for m in receiver.store.messages(kind="alert") if m.claims["body"]["location"] == "North gate"],
            20,
        )


def test_a_pushed_zone_change_takes_effect_on_the_camera_box(site, receiver, mock_factory, tmp_path):
    from tests.agent.vision.scenes import MODEL_DIR, VIDEO, require_shared

    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    corner = '[[zones]]\nname = "plaza"\npolygon = [[0.0, 0.0], [0.03, 0.0], [0.0, 0.03]]\n'
    rule = '[[rules]]\nname = "walk-in"\ntype = "intrusion"\nzone = "plaza"\n'
    body = (
        f'{BUTTONS}\n[camera]\nsource = "{VIDEO}"\nname = "plaza"\nrealtime = true\nloop = true\n\n'
        f'[detector]\nmodel_dir = "{MODEL_DIR}"\n\n{corner}\n{rule}'
    )
    site.add_device("cam-1", kind="camera-box", body=body)
    starting = load_for_start(site.device_config_path("cam-1"))

    def camera_alerts():
        return [m for m in receiver.store.messages(kind="alert") if m.claims["body"].get("rule") == "walk-in"]

    with Agent(starting.config, pin_factory=mock_factory, starting=starting) as agent:
        assert wait_until(lambda: agent.vision.stats.get("frames"), 60)
        assert not camera_alerts()  # nobody walks in the top-left corner
        whole = '[[zones]]\nname = "plaza"\npolygon = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]\n'
        assert push(site, tmp_path, whole, "--device", "cam-1", "--gate", "120") == 0
        assert wait_until(lambda: outcomes(receiver.store), 150)
        (report,) = outcomes(receiver.store)
        assert report["outcome"] == "applied" and report["changed"] == ["zones"]
        assert wait_until(camera_alerts, 60)  # the whole plaza is the zone now: people walk in
        assert agent.config.zones[0].polygon[2] == (1.0, 1.0)
