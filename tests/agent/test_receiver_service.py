"""The receiver as the centre runs it: enrolment from the CLI, rejection over MQTT, the run command."""

import json
import os
import signal
import subprocess
import sys
import time

from agent.centre.keyring import Keyring
from agent.centre.store import ReceiverStore
from agent.cli import main
from agent.mqtt.link import MqttLink
from agent.protocol.messages import new_claims
from agent.protocol.signing import MessageSigner, generate_private_key
from tests.conftest import wait_until


def test_enroll_accepts_the_record_printed_by_keys_init(site, tmp_path, capsys):
    config_path = tmp_path / "dev.toml"
    config_path.write_text(
        '[device]\nid = "cp-7"\nsite = "s1"\nkind = "call-point"\nstate_dir = "st"\ncredentials_dir = "cr"\n'
        '[mqtt]\nhost = "b"\n[[buttons]]\nname = "m"\npin = 4\n'
    )
    assert main(["keys", "init", "--config", str(config_path)]) == 0
    record = tmp_path / "record.json"
    record.write_text(capsys.readouterr().out)
    assert main(["receiver", "enroll", str(record), "--config", str(site.receiver_toml_path())]) == 0
    assert "enrolled s1/cp-7 with key" in capsys.readouterr().out
    (device,) = [d for d in Keyring(site.receiver_config.keyring_path).devices() if d.device_id == "cp-7"]
    assert device.kid == json.loads(record.read_text())["kid"]


def test_enroll_refuses_a_private_key_or_a_wrong_kid(site, tmp_path, capsys):
    key = generate_private_key(tmp_path / "k.pem")
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"device_id": "cp-8", "site": "s1", "jwk": key.as_dict(private=True)}))
    assert main(["receiver", "enroll", str(private), "--config", str(site.receiver_toml_path())]) == 1
    assert "holds a private key; only the public JWK may be shared" in capsys.readouterr().err
    record = {"device_id": "cp-8", "site": "s1", "jwk": {**key.as_dict(private=False), "kid": "made-up"}}
    private.write_text(json.dumps(record))
    assert main(["receiver", "enroll", str(private), "--config", str(site.receiver_toml_path())]) == 1
    assert "jwk kid 'made-up' is not the key's thumbprint" in capsys.readouterr().err


def test_rejected_messages_over_mqtt_are_counted_and_never_acknowledged(site, receiver, tmp_path):
    stranger = MessageSigner(generate_private_key(tmp_path / "stranger.pem"))
    acks = []
    with MqttLink(site.receiver_config.mqtt, client_id="intruder", secret_dirs=(tmp_path,)) as link:
        link.on_message = lambda topic, payload: acks.append(payload)
        link.subscribe("edge/+/+/ack")
        link.start()
        assert link.wait_subscribed(10)  # else no ack could reach us and "no acks" would prove nothing
        claims = new_claims(device="cp-x", site=site.site, seq=1, kind="alert", body={})
        link.publish(f"edge/{site.site}/cp-x/alert", stranger.sign(claims).encode())
        link.publish(f"edge/{site.site}/cp-x/alert", b"garbage")
        assert wait_until(lambda: receiver.counters["unknown_device"] == 1 and receiver.counters["malformed"] == 1)
        time.sleep(0.3)  # deliberate: time for an ack to arrive, were one sent
    assert acks == [] and receiver.store.messages() == []


def centre_lists_online(site, device: str) -> bool:
    """The receiver has heard from the device and holds it online.

    The receiver asks for its alert subscription first, so once anything from the device reaches it, alerts do too.
    """
    with ReceiverStore(site.receiver_config.database_path) as store:
        states = store.registry(site.receiver_config.receiver.supervision_s).states()
    return any(s.device == device and s.status == "online" for s in states)


def test_agent_and_receiver_commands_run_and_stop_on_sigterm(site, tmp_path):
    config = site.add_device("cp-run")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    receiver = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "receiver", "--config", str(site.receiver_toml_path())],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "--log-format",
            "json",
            "run",
            "--mock-pins",
            "--config",
            str(site.device_config_path("cp-run")),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: config.control_socket.exists(), 15)
        assert wait_until(lambda: centre_lists_online(site, "cp-run"), 15)  # agent connected, receiver subscribed
        cli = [sys.executable, "-m", "agent.cli"]
        test = subprocess.run(
            [*cli, "test-alert", "--config", str(site.device_config_path("cp-run"))],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert test.returncode == 0, test.stderr

        def acknowledged():
            status = subprocess.run(
                [*cli, "status", "--config", str(site.device_config_path("cp-run"))],
                capture_output=True,
                text=True,
                timeout=30,
            )
            return json.loads(status.stdout)["delivery"]["acknowledged"] >= 1

        assert wait_until(acknowledged, 20, interval=0.5)
    finally:
        for process in (agent, receiver):
            process.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=20) for p in (agent, receiver)]
    assert codes == [0, 0]
    log = agent.stderr.read()
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is one JSON object
    messages = [e["message"] for e in entries]
    assert "agent demo-site/cp-run stopped" in messages
    assert any(m.startswith("test alert seq") and m.endswith("accepted from button 'main'") for m in messages)
    assert "PRIVATE KEY" not in log and '"d":' not in log
    assert {e["level"] for e in entries} <= {"INFO", "WARNING"}


def test_centre_keeps_records_only_for_its_retention(site, tmp_path):
    from agent.centre.receiver import Receiver
    from agent.config.centre import load_receiver_config

    path = site.receiver_toml_path()
    path.write_text(
        path.read_text().replace(
            'credentials_dir = "credentials"', 'credentials_dir = "credentials"\nretention_days = 7'
        )
    )
    config = load_receiver_config(path)
    with Receiver(config) as first:
        old = new_claims(device="cp-old", site=site.site, seq=1, kind="alert", body={})
        recent = new_claims(device="cp-old", site=site.site, seq=2, kind="alert", body={})
        first.store.insert(old, time.time() - 8 * 86400)
        first.store.insert(recent, time.time() - 6 * 86400)
    with Receiver(config) as second:  # prunes at start, then hourly
        assert wait_until(lambda: [m.seq for m in second.store.messages(device="cp-old")] == [2], 5)


def test_a_slow_receiver_holds_at_most_max_inflight_and_still_stores_everything(site, mock_factory):
    """Backpressure, not growth: a full inbox stops paho reading, the broker keeps the rest, nothing is lost."""
    from agent.centre.receiver import Receiver
    from agent.config.centre import load_receiver_config
    from agent.device.agent import Agent

    path = site.receiver_toml_path()
    path.write_text(
        path.read_text().replace('credentials_dir = "credentials"', 'credentials_dir = "credentials"\nmax_inflight = 3')
    )
    deepest = []

    def slow_store(verdict):  # called on the receiver's worker after each message
        deepest.append(receiver._inbox.qsize())
        time.sleep(0.02)

    with Receiver(load_receiver_config(path), on_verdict=slow_store) as receiver:
        assert receiver.link.wait_subscribed(10)
        with Agent(site.add_device("cp-burst"), pin_factory=mock_factory) as agent:
            entries = [agent.raise_alert("main") for _ in range(60)]
            assert wait_until(lambda: agent.delivery.stats.acknowledged == 60, 60)
        stored = {m.event_id for m in receiver.store.messages(kind="alert")}
    assert stored == {e.event_id for e in entries}
    assert max(deepest) <= 3
