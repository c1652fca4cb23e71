"""A call point stays light, and the broker's user name and password are honoured."""

import subprocess
import sys
import time

import pytest

from agent.config.mqtt import MqttSection, TlsSection
from agent.demo.broker import LocalBroker
from agent.errors import ConfigError, MosquittoMissing
from agent.mqtt.link import MqttLink


def test_button_only_device_imports_no_numpy_opencv_or_interpreter():
    code = (
        "import sys, agent.cli, agent.device.agent, agent.centre.receiver, agent.demo.run;"
        "print(sorted({'numpy', 'cv2', 'ai_edge_litert', 'tflite_runtime'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.fixture
def auth_broker(tmp_path):
    passwords = tmp_path / "passwd"
    passwords.write_text("")
    try:
        subprocess.run(["mosquitto_passwd", "-b", str(passwords), "cp-1", "s3cret"], check=True, capture_output=True)
    except FileNotFoundError:
        pytest.skip("mosquitto_passwd is not installed (Debian package mosquitto)")
    passwords.chmod(0o644)
    try:
        with LocalBroker(workdir=tmp_path / "m", listener_config=f"password_file {passwords}\n") as broker:
            yield broker
    except MosquittoMissing as exc:
        pytest.skip(str(exc))


def link(broker, tmp_path, **settings) -> MqttLink:
    mqtt = MqttSection(host=broker.host, port=broker.port, tls=TlsSection(enabled=False), **settings)
    return MqttLink(mqtt, client_id=f"auth-{time.monotonic_ns()}", secret_dirs=(tmp_path,))


def test_password_from_a_file_authenticates(auth_broker, tmp_path):
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    with link(auth_broker, tmp_path, username="cp-1", password_file="mqtt-password") as client:
        client.start()
        assert client.wait_connected(10)


def test_wrong_password_is_refused(auth_broker, tmp_path):
    (tmp_path / "mqtt-password").write_text("guess\n")
    with link(auth_broker, tmp_path, username="cp-1", password_file="mqtt-password") as client:
        reason = client.probe(5)
    assert reason in (  # the login itself refused (mosquitto 2.0 says "Not authorized"), not a network or TLS failure
        "broker refused the connection: Not authorized",
        "broker refused the connection: Bad user name or password",
    ), reason


def test_missing_password_file_names_the_setting(auth_broker, tmp_path):
    with pytest.raises(ConfigError, match=r"mqtt.password_file: cannot read .*/nope"):
        link(auth_broker, tmp_path, username="cp-1", password_file="nope")
