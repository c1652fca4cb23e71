"""An installer's day on a temporary root: provision → enroll → selftest → run, and selftest catching faults."""

import json
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from agent.centre.receiver import Receiver
from agent.cli import main
from agent.config.device import load_agent_config
from agent.device.agent import Agent
from tests.conftest import SHARED_DIR, wait_until


@pytest.fixture
def centre_jwk(site, tmp_path):
    """The centre's public key set, as 'receiver init' prints it."""
    path = tmp_path / "centre.jwk"
    path.write_text(json.dumps(site.centre_keys))
    return path


def provision(broker, root, centre_jwk, capsys, kind="call-point", device="cp-42", extra=()):
    args = [
        "provision",
        "--device-id",
        device,
        "--site",
        "demo-site",
        "--kind",
        kind,
        "--broker",
        f"mqtt://{broker.host}:{broker.port}",
        "--centre-key",
        str(centre_jwk),
        "--location",
        "Storgata 1",
        "--root",
        str(root),
        *extra,
    ]
    code = main(args)
    captured = capsys.readouterr()
    return code, captured


def selftest(config, capsys, *extra):
    code = main(["selftest", "--config", str(config), "--mock-pins", "--json", "--timeout", "5", *extra])
    return code, {c["name"]: c for c in json.loads(capsys.readouterr().out)}


def test_provision_enroll_selftest_run(site, receiver, broker, tmp_path, centre_jwk, capsys, mock_factory):
    root = tmp_path / "root"
    code, out = provision(broker, root, centre_jwk, capsys)
    assert code == 0
    record = json.loads(out.out)
    assert record["device_id"] == "cp-42" and record["kind"] == "call-point" and "fingerprint" in record
    assert "█" in out.err  # the QR code for the installer's phone
    key = root / "etc/edge-agent/credentials/device-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    config_path = root / "etc/edge-agent/agent.toml"
    config = load_agent_config(config_path)
    assert config.buttons[0].location == "Storgata 1" and config.mqtt.port == broker.port

    assert provision(broker, root, centre_jwk, capsys)[0] == 1  # never silently replaces an identity

    record_file = tmp_path / "record.json"
    record_file.write_text(out.out)
    assert main(["receiver", "enroll", str(record_file), "--config", str(site.receiver_toml_path())]) == 0
    capsys.readouterr()  # the running receiver reads the keyring again when it changes: no wait needed

    code, checks = selftest(config_path, capsys)
    assert code == 0, checks
    assert {
        "config",
        "device key",
        "centre key",
        "GPIO button 'help'",
        "GPIO LED",
        "broker",
        "centre round trip",
        "clock",
        "disk",
    } <= set(checks)
    assert "acknowledged by centre-1" in checks["centre round trip"]["detail"]

    with Agent(config, pin_factory=mock_factory) as agent:
        assert agent.link.wait_connected(10)
        mock_factory.pin(17).drive_low()
        mock_factory.pin(17).drive_high()
        assert wait_until(lambda: [m for m in receiver.store.messages(kind="alert") if m.device == "cp-42"], 10)


def test_selftest_interactive_press(site, receiver, broker, tmp_path, centre_jwk, capsys, monkeypatch):
    from gpiozero.pins.mock import MockFactory

    from agent.install.selftest import SelfTest

    root = tmp_path / "root"
    assert provision(broker, root, centre_jwk, capsys, kind="building-button", device="bb-1")[0] == 0
    factory = MockFactory()
    asked_to_press = threading.Event()

    def installer_presses():  # presses once the self-test asks, from another thread as a person would
        if asked_to_press.wait(10):
            factory.pin(17).drive_low()

    def say(text):
        if text.startswith("press button 'alarm'"):
            asked_to_press.set()

    threading.Thread(target=installer_presses, daemon=True).start()
    test = SelfTest(
        root / "etc/edge-agent/agent.toml",
        pin_factory=factory,
        interactive=True,
        timeout_s=3,
        ask=lambda question: "y",
        say=say,
    )
    checks = {c.name: c for c in test.run()}
    assert checks["press button 'alarm'"].ok and checks["LED pulse"].ok


def test_selftest_reports_a_wrong_pin(site, broker, tmp_path, centre_jwk, capsys):
    root = tmp_path / "root"
    provision(broker, root, centre_jwk, capsys)
    config_path = root / "etc/edge-agent/agent.toml"
    config_path.write_text(config_path.read_text().replace("pin = 27", "pin = 99"))
    code, checks = selftest(config_path, capsys)
    assert code == 1
    wrong = checks["GPIO button 'duress'"]
    assert not wrong["ok"] and "pin 99: 99 is not a valid pin name" in wrong["detail"]
    assert "check the pin number" in wrong["hint"]
    assert checks["GPIO button 'help'"]["ok"]


@pytest.mark.skipif(any(Path("/dev").glob("gpiochip*")), reason="this machine has GPIO chips")
def test_selftest_without_a_gpio_chip_names_what_is_missing(site, broker, tmp_path, centre_jwk, capsys, monkeypatch):
    from gpiozero import Device

    root = tmp_path / "root"
    provision(broker, root, centre_jwk, capsys)
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "lgpio")
    monkeypatch.setattr(Device, "pin_factory", None)
    code = main(["selftest", "--config", str(root / "etc/edge-agent/agent.toml"), "--json", "--timeout", "5"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert code == 1
    gpio = checks["GPIO"]
    assert not gpio["ok"] and "no GPIO chip on this machine (no /dev/gpiochip*)" in gpio["detail"]
    assert "the lgpio pin factory cannot start" in gpio["detail"] and "--mock-pins" in gpio["hint"]
    assert not [name for name in checks if name.startswith("GPIO ")]  # said once, not once per line
    assert checks["device key"]["ok"] and checks["broker"]["ok"]  # the rest is still checked


def test_selftest_reports_an_unreachable_broker(site, broker, tmp_path, centre_jwk, capsys):
    root = tmp_path / "root"
    provision(broker, root, centre_jwk, capsys)
    broker.stop()
    code, checks = selftest(root / "etc/edge-agent/agent.toml", capsys)
    assert code == 1
    assert not checks["broker"]["ok"] and f"cannot reach 127.0.0.1:{broker.port}" in checks["broker"]["detail"]


def test_selftest_reports_a_clock_off_the_centres(site, broker, tmp_path, centre_jwk, capsys):
    root = tmp_path / "root"
    _, out = provision(broker, root, centre_jwk, capsys)
    site.keyring.enroll(json.loads(out.out))
    with Receiver(site.receiver_config, clock=lambda: time.time() + 120) as receiver:  # the device is 2 minutes behind
        assert receiver.link.wait_subscribed(10)
        code, checks = selftest(root / "etc/edge-agent/agent.toml", capsys)
    assert code == 1
    assert not checks["centre round trip"]["ok"]
    assert not checks["clock"]["ok"]


def test_selftest_reports_a_wrong_model_hash(site, broker, tmp_path, centre_jwk, capsys):
    model = SHARED_DIR / "models" / "ssd_mobilenet_v1_coco_quant.tflite"
    video = SHARED_DIR / "data" / "vtest.avi"
    if not model.exists() or not video.exists():
        pytest.skip(f"{model} or {video} is absent")
    root = tmp_path / "root"
    provision(broker, root, centre_jwk, capsys, kind="camera-box", device="cam-2", extra=("--camera", str(video)))
    models = root / "var/lib/edge-agent/models"
    models.mkdir(parents=True)
    shutil.copy(model, models)
    with (models / model.name).open("ab") as handle:
        handle.write(b"!")
    code, checks = selftest(root / "etc/edge-agent/agent.toml", capsys)
    assert code == 1
    assert checks["camera"]["ok"] and "768x576" in checks["camera"]["detail"]
    assert not checks["model"]["ok"] and "but the manifest expects" in checks["model"]["detail"]
    assert checks["model"]["hint"] == "edge-agent models fetch ssd-mobilenet-v1-coco-quant"
    assert not checks["face model"]["ok"] and "no picture can be written" in checks["face model"]["detail"]
    assert checks["face model"]["hint"] == "edge-agent models fetch blazeface-full-range"


def test_provision_refuses_bad_arguments(tmp_path, capsys):
    assert (
        main(
            [
                "provision",
                "--device-id",
                "x",
                "--site",
                "s",
                "--kind",
                "call-point",
                "--broker",
                "http://b",
                "--root",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "expected mqtts://host[:port] or mqtt://host[:port]" in capsys.readouterr().err
    assert (
        main(
            [
                "provision",
                "--device-id",
                "bad id!",
                "--site",
                "s",
                "--kind",
                "call-point",
                "--broker",
                "mqtts://b",
                "--root",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "device.id = 'bad id!'" in capsys.readouterr().err
    assert not (tmp_path / "etc/edge-agent/agent.toml").exists()


def test_receiver_init_creates_the_missing_centre_keys_and_prints_the_public_set(tmp_path, capsys):
    config = tmp_path / "receiver.toml"
    config.write_text('[receiver]\nstate_dir = "state"\ncredentials_dir = "credentials"\n[mqtt]\nhost = "localhost"\n')
    assert main(["receiver", "init", "--config", str(config)]) == 0
    out = capsys.readouterr()
    printed = json.loads(out.out)
    assert [(k["crv"], k["use"]) for k in printed["keys"]] == [("Ed25519", "sig"), ("X25519", "enc")]
    assert all("d" not in key for key in printed["keys"])
    assert json.loads((tmp_path / "state/centre.jwk").read_text()) == printed
    for name in ("centre-key.pem", "centre-enc-key.pem"):
        assert stat.S_IMODE((tmp_path / "credentials" / name).stat().st_mode) == 0o600
    assert "created the centre's encryption key" in out.err

    (tmp_path / "credentials/centre-enc-key.pem").unlink()  # a centre from before evidence was sealed
    assert main(["receiver", "init", "--config", str(config)]) == 0
    out = capsys.readouterr()
    again = json.loads(out.out)
    assert again["keys"][0] == printed["keys"][0] and again["keys"][1] != printed["keys"][1]
    assert "kept the centre's signing key" in out.err and "created the centre's encryption key" in out.err


def test_provision_takes_the_key_set_or_the_older_single_jwk(site, broker, tmp_path, capsys):
    single = tmp_path / "single.jwk"
    single.write_text(json.dumps(site.centre_jwk))
    assert provision(broker, tmp_path / "a", single, capsys)[0] == 0
    key_set = tmp_path / "set.jwk"
    key_set.write_text(json.dumps(site.centre_keys))
    assert provision(broker, tmp_path / "b", key_set, capsys)[0] == 0
    installed = tmp_path / "b/etc/edge-agent/credentials/centre.jwk"
    assert json.loads(installed.read_text()) == site.centre_keys

    leaked = tmp_path / "leaked.jwk"
    leaked.write_text(json.dumps({"keys": [site.centre_jwk, {**site.centre_keys["keys"][1], "d": "AAAA"}]}))
    code, out = provision(broker, tmp_path / "c", leaked, capsys)
    assert code == 1 and "the encryption key must be a public OKP JWK (no 'd')" in out.err
    assert not (tmp_path / "c/etc/edge-agent/agent.toml.new").exists()


def test_selftest_reports_evidence_rules_without_the_centres_encryption_key(site, broker, tmp_path, capsys):
    single = tmp_path / "single.jwk"
    single.write_text(json.dumps(site.centre_jwk))
    root = tmp_path / "root"
    code, out = provision(broker, root, single, capsys, kind="camera-box", device="cam-3")
    assert code == 0 and "has no encryption key: this camera box cannot send evidence images" in out.err
    config_path = root / "etc/edge-agent/agent.toml"
    config_path.write_text(config_path.read_text().replace('type = "grouping"', 'type = "grouping"\nevidence = true'))
    code, checks = selftest(config_path, capsys)
    assert code == 1
    assert not checks["centre key"]["ok"]
    assert "rule(s) grouping set evidence = true" in checks["centre key"]["detail"]
    assert checks["centre key"]["hint"] == "copy the key set 'edge-agent receiver init' printed there"


def test_provision_puts_the_map_position_and_location_in_the_record(site, broker, tmp_path, centre_jwk, capsys):
    geo = ("--lat", "59.9139", "--lon", "10.7522")
    code, out = provision(broker, tmp_path / "geo", centre_jwk, capsys, extra=geo)
    assert code == 0, out.err
    record = json.loads(out.out)
    assert record["position"] == {"lat": 59.9139, "lon": 10.7522} and record["location"] == "Storgata 1"
    on_plan = ("--plan", "ground-floor", "--plan-x", "120", "--plan-y", "45.5")
    code, out = provision(broker, tmp_path / "plan", centre_jwk, capsys, device="cp-43", extra=on_plan)
    assert code == 0, out.err
    record_file = tmp_path / "record.json"
    record_file.write_text(out.out)
    assert main(["receiver", "enroll", str(record_file), "--config", str(site.receiver_toml_path())]) == 0
    (device,) = [d for d in site.keyring.devices() if d.device_id == "cp-43"]
    assert (device.position.plan, device.position.x, device.position.y) == ("ground-floor", 120.0, 45.5)
    assert device.position.lat is None and device.location == "Storgata 1"


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (("--lat", "95", "--lon", "10"), "outside"),
        (("--lat", "59.9"), "both lat and lon"),
        (("--lat", "nan", "--lon", "10"), "not a finite number"),
        (("--plan", "roof"), "no x and y"),
        (("--plan-x", "1"), "both x and y"),
    ],
)
def test_provision_refuses_a_bad_position_before_writing_anything(
    broker, tmp_path, centre_jwk, capsys, flags, complaint
):
    code, out = provision(broker, tmp_path, centre_jwk, capsys, extra=flags)
    assert code == 2 and complaint in out.err
    assert not (tmp_path / "etc/edge-agent").exists()
