"""One identity per device at a real mosquitto: the centre's CA, the generated ACL, revocation."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as paho
import pytest
from cryptography import x509

from agent.centre.ca import DeviceCA, listener_lines, pem_cert, verify_issued, write_broker_config
from agent.centre.receiver import Receiver
from agent.cli import main
from agent.config.centre import load_receiver_config
from agent.config.device import load_agent_config
from agent.config.mqtt import MqttSection
from agent.demo.broker import LocalBroker, free_port
from agent.demo.site import LocalSite
from agent.errors import ConfigError, MosquittoMissing
from agent.install.provisioning import tls_key_and_csr
from agent.mqtt.link import MqttLink
from agent.protocol.messages import new_claims
from agent.protocol.signing import MessageSigner, load_private_key
from tests.conftest import wait_until


@pytest.fixture
def centre(tmp_path):
    """A device CA and the broker files ``centre broker-config`` writes, readable by mosquitto."""
    tmp_path.chmod(0o755)
    ca = DeviceCA(tmp_path / "ca")
    ca.init()
    out = tmp_path / "broker"
    write_broker_config(ca, out, hosts=("127.0.0.1",))
    return ca, out


@pytest.fixture
def acl_broker(tmp_path, centre):
    """mosquitto with the generated listener options and ACL (on a free loopback port)."""
    ca, out = centre
    try:
        with LocalBroker(
            workdir=tmp_path / "mosquitto",
            global_config=f"acl_file {out / 'acl'}",
            listener_config=listener_lines(out, ca.crl_path),
        ) as running:
            yield running
    except MosquittoMissing as exc:
        pytest.skip(str(exc))


def device_identity(tmp_path, ca, site, device_id):
    """Key and CSR made as ``provision --csr`` makes them; the certificate signed by the centre's CA."""
    directory = tmp_path / f"{site}-{device_id}"
    directory.mkdir()
    csr = tls_key_and_csr(directory / "key.pem", site, device_id)
    cert = ca.issue_for_csr(csr, f"{site}/{device_id}", "test record")
    (directory / "cert.pem").write_bytes(pem_cert(cert))
    return directory / "cert.pem", directory / "key.pem"


class Client:
    """A paho client holding one certificate; records PUBACK and SUBACK reason codes."""

    def __init__(self, broker, ca_file, cert, key):
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.tls_set(ca_certs=str(ca_file), certfile=str(cert), keyfile=str(key))
        self.pubacks: dict[int, paho.ReasonCode] = {}
        self.subacks: dict[int, list] = {}
        self.connected = None
        self.messages: list[tuple[str, bytes]] = []
        self.client.on_connect = lambda c, u, f, rc, p: setattr(self, "connected", rc)
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.__setitem__(mid, rcs)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect_async(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic, payload=b"x"):
        mid = self.client.publish(topic, payload, qos=1).mid
        assert wait_until(lambda: mid in self.pubacks, 5)
        return self.pubacks[mid]

    def subscribe(self, topic):
        _, mid = self.client.subscribe(topic, qos=1)
        assert wait_until(lambda: mid in self.subacks, 5)
        return self.subacks[mid][0]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients(acl_broker, centre):
    made = []

    def connect(cert, key):
        client = Client(acl_broker, centre[1] / "ca.pem", cert, key)
        made.append(client)
        return client

    yield connect
    for client in made:
        client.close()


def test_issued_certificate_names_site_and_device_and_verifies(tmp_path, centre):
    ca, _ = centre
    cert_path, key_path = device_identity(tmp_path, ca, "site-a", "cp-1")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    verify_issued(ca, cert)
    assert cert.subject.rfc4514_string() == "CN=site-a/cp-1"
    assert oct((ca.directory / "ca-key.pem").stat().st_mode & 0o777) == "0o600"
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"


def test_a_csr_whose_signature_does_not_verify_is_refused(tmp_path, centre):
    ca, _ = centre
    good = tls_key_and_csr(tmp_path / "k.pem", "site-a", "cp-1")
    lines = good.splitlines()
    body = "".join(lines[1:-1])
    tampered = body[:-10] + ("A" if body[-10] != "A" else "B") + body[-9:]
    with pytest.raises(ConfigError):
        ca.issue_for_csr(f"{lines[0]}\n{tampered}\n{lines[-1]}\n", "site-a/cp-1", "record")
    with pytest.raises(ConfigError, match="not a PEM"):
        ca.issue_for_csr("garbage", "site-a/cp-1", "record")


def test_a_device_cannot_publish_on_another_devices_topics(tmp_path, centre, clients):
    ca, _ = centre
    a = clients(*device_identity(tmp_path, ca, "site-a", "cp-1"))
    receiver = clients(centre[1] / "receiver.pem", centre[1] / "receiver-key.pem")
    assert wait_until(lambda: a.connected is not None and receiver.connected is not None, 10)
    assert not a.connected.is_failure and not receiver.connected.is_failure
    assert not receiver.subscribe("edge/+/+/alert").is_failure
    assert not a.publish("edge/site-a/cp-1/alert", b"own").is_failure
    refused = a.publish("edge/site-a/cp-2/alert", b"forged")
    assert str(refused) == "Not authorized" and refused.value == 0x87
    assert str(a.publish("edge/site-b/cp-1/alert", b"other site")) == "Not authorized"
    assert wait_until(lambda: receiver.messages == [("edge/site-a/cp-1/alert", b"own")], 5)
    time.sleep(0.2)  # deliberate: a forged message would have arrived by now
    assert receiver.messages == [("edge/site-a/cp-1/alert", b"own")]


def test_a_device_cannot_read_another_devices_acks(tmp_path, centre, clients):
    """mosquitto's acl_file grants every SUBSCRIBE (eclipse/mosquitto#803) and filters at delivery instead."""
    ca, out = centre
    a = clients(*device_identity(tmp_path, ca, "site-a", "cp-1"))
    b = clients(*device_identity(tmp_path, ca, "site-a", "cp-2"))
    receiver = clients(out / "receiver.pem", out / "receiver-key.pem")
    assert wait_until(lambda: None not in (a.connected, b.connected, receiver.connected), 10)
    for topic in ("edge/site-a/cp-2/ack", "edge/+/+/ack", "edge/site-a/cp-2/evidence-request", "edge/#"):
        a.subscribe(topic)
    assert not b.subscribe("edge/site-a/cp-2/#").is_failure
    for channel in ("ack", "evidence-request"):
        assert not receiver.publish(f"edge/site-a/cp-2/{channel}", b"for cp-2").is_failure
    assert wait_until(lambda: len(b.messages) == 2, 5)
    assert {topic for topic, _ in b.messages} == {"edge/site-a/cp-2/ack", "edge/site-a/cp-2/evidence-request"}
    assert not b.publish("edge/site-a/cp-2/status", b"online").is_failure  # b's own; a may not read it either
    assert wait_until(lambda: len(b.messages) == 2 and b.pubacks, 5)
    time.sleep(0.2)  # deliberate: anything a could read would have arrived by now
    assert a.messages == []


def test_a_device_cannot_answer_for_the_centre(tmp_path, centre, clients):
    ca, _ = centre
    a = clients(*device_identity(tmp_path, ca, "site-a", "cp-1"))
    assert wait_until(lambda: a.connected is not None, 10)
    for topic in ("edge/site-a/cp-1/ack", "edge/site-a/cp-2/ack", "edge/site-a/cp-1/evidence-request", "other/x"):
        assert str(a.publish(topic)) == "Not authorized", topic


def test_a_revoked_certificate_cannot_connect_after_the_broker_restarts(tmp_path, centre, acl_broker, clients):
    ca, _ = centre
    cert, key = device_identity(tmp_path, ca, "site-a", "cp-1")
    before = clients(cert, key)
    assert wait_until(lambda: before.connected is not None, 10) and not before.connected.is_failure
    before.close()
    assert "certificate verify failed" not in acl_broker.log_path.read_text()
    assert main(["centre", "ca", "revoke", "--ca-dir", str(ca.directory), "site-a/cp-1"]) == 0
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert [r.serial_number for r in crl] == [x509.load_pem_x509_certificate(cert.read_bytes()).serial_number]
    acl_broker.stop()
    acl_broker.start()
    after = clients(cert, key)
    assert wait_until(lambda: "certificate verify failed" in acl_broker.log_path.read_text(), 10)
    assert after.connected is None  # the TLS handshake fails: no CONNACK at all
    other = clients(*device_identity(tmp_path, ca, "site-a", "cp-2"))
    assert wait_until(lambda: other.connected is not None, 10) and not other.connected.is_failure


def _use_tls(path, ca_file, cert, key):
    text = path.read_text().replace(
        "[mqtt.tls]\nenabled = false\n",
        f'[mqtt.tls]\nenabled = true\nca_file = "{ca_file}"\ncert_file = "{cert}"\nkey_file = "{key}"\n',
    )
    path.write_text(text)


def test_an_alert_goes_end_to_end_through_the_generated_config(tmp_path, centre, acl_broker):
    ca, out = centre
    site = LocalSite(tmp_path / "site", acl_broker, site="site-a")
    _use_tls(site.receiver_toml_path(), out / "ca.pem", out / "receiver.pem", out / "receiver-key.pem")
    site.add_device("cp-1")
    device_config = site.device_config_path("cp-1")
    _use_tls(device_config, out / "ca.pem", *device_identity(tmp_path, ca, "site-a", "cp-1"))
    config = load_agent_config(device_config)
    signer = MessageSigner(load_private_key(config.secret_dirs[0] / config.identity.private_key_file))
    settings = MqttSection(**config.mqtt.model_dump())
    with Receiver(load_receiver_config(site.receiver_toml_path())) as receiver:
        assert receiver.link.wait_subscribed(10)
        with MqttLink(settings, client_id="cp-1", secret_dirs=config.secret_dirs) as link:
            acks = []
            link.on_message = lambda topic, payload: acks.append((topic, payload))
            link.start()
            assert link.wait_connected(10)
            link.subscribe("edge/site-a/cp-1/ack")
            assert link.wait_subscribed(5)
            claims = new_claims(
                device="cp-1", site="site-a", seq=1, kind="alert", body={"button": "main", "alert_kind": "assistance"}
            )
            link.publish("edge/site-a/cp-1/alert", signer.sign(claims).encode())
            assert wait_until(lambda: acks, 10)
        (stored,) = receiver.store.messages(kind="alert")
        assert (stored.site, stored.device) == ("site-a", "cp-1")
    assert acks[0][0] == "edge/site-a/cp-1/ack"


def test_centre_cli_init_issue_and_broker_config(tmp_path, capsys):
    ca_dir = tmp_path / "ca"
    assert main(["centre", "ca", "init", "--ca-dir", str(ca_dir)]) == 0
    csr = tls_key_and_csr(tmp_path / "key.pem", "site-a", "cp-9")
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"device_id": "cp-9", "site": "site-a", "csr": csr}))
    cert = tmp_path / "cp-9.pem"
    assert main(["centre", "ca", "issue", "--ca-dir", str(ca_dir), str(record), "--out", str(cert)]) == 0
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    assert issued.subject.rfc4514_string() == "CN=site-a/cp-9"
    out = tmp_path / "broker"
    assert (
        main(["centre", "broker-config", "--ca-dir", str(ca_dir), "--out", str(out), "--host", "broker.example"]) == 0
    )
    conf = (out / "mosquitto.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", f"crlfile {ca_dir.resolve()}/crl.pem"):
        assert line in conf
    assert "pattern write edge/%u/alert" in (out / "acl").read_text()
    assert "pattern read edge/%u/ack" in (out / "acl").read_text()


def test_provision_csr_key_stays_on_the_device_and_the_issued_certificate_connects(
    tmp_path, centre, acl_broker, capsys
):
    ca, out = centre
    root = tmp_path / "root"
    argv = ["provision", "--device-id", "cp-7", "--site", "site-a", "--kind", "call-point", "--no-qr", "--csr"]
    argv += ["--broker", f"mqtts://{acl_broker.host}:{acl_broker.port}", "--ca-file", str(out / "ca.pem")]
    assert main([*argv, "--root", str(root)]) == 0
    record = json.loads(capsys.readouterr().out)
    credentials = root / "etc/edge-agent/credentials"
    assert oct((credentials / "client-cert-key.pem").stat().st_mode & 0o777) == "0o600"
    assert "PRIVATE KEY" not in json.dumps(record) and record["csr"].startswith("-----BEGIN CERTIFICATE REQUEST")
    (tmp_path / "record.json").write_text(json.dumps(record))
    issue = ["centre", "ca", "issue", "--ca-dir", str(ca.directory), str(tmp_path / "record.json")]
    assert main([*issue, "--out", str(credentials / "client-cert.pem")]) == 0
    config = load_agent_config(root / "etc/edge-agent/agent.toml")
    assert (config.mqtt.tls.cert_file, config.mqtt.tls.key_file) == ("client-cert.pem", "client-cert-key.pem")
    with MqttLink(config.mqtt, client_id="cp-7", secret_dirs=config.secret_dirs) as link:
        results = {}
        link.on_published = lambda mid, ok, reason: results.__setitem__(mid, (ok, reason))
        link.start()
        assert link.wait_connected(10)
        own = link.publish("edge/site-a/cp-7/alert", b"x")
        other = link.publish("edge/site-a/cp-1/alert", b"x")
        assert wait_until(lambda: own in results and other in results, 5)
    assert results[own][0] and results[other] == (False, "Not authorized")


def test_provision_csr_needs_tls_and_no_certificate_given(tmp_path, capsys):
    argv = ["provision", "--device-id", "cp-7", "--site", "site-a", "--kind", "call-point", "--no-qr", "--csr"]
    assert main([*argv, "--broker", "mqtt://127.0.0.1:1883", "--root", str(tmp_path)]) == 2
    assert "--csr" in capsys.readouterr().err


def test_username_and_password_logins_get_the_same_acl(tmp_path, centre):
    """The same acl file serves a password_file broker when each device's username is '<site>/<device>'."""
    _, out = centre
    passwords = tmp_path / "passwords"
    passwords.write_text("")
    for user in ("site-a/cp-1", "centre-receiver"):
        subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, "secret"], check=True, capture_output=True)
    passwords.chmod(0o644)
    try:
        broker = LocalBroker(
            workdir=tmp_path / "mosquitto-pw",
            global_config=f"acl_file {out / 'acl'}\npassword_file {passwords}\nper_listener_settings false",
        )
    except MosquittoMissing as exc:
        pytest.skip(str(exc))
    with broker:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        client.username_pw_set("site-a/cp-1", "secret")
        acks = {}
        client.on_publish = lambda c, u, mid, rc, p: acks.__setitem__(mid, rc)
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            own = client.publish("edge/site-a/cp-1/alert", b"x", qos=1).mid
            other = client.publish("edge/site-a/cp-2/alert", b"x", qos=1).mid
            assert wait_until(lambda: own in acks and other in acks, 5)
        finally:
            client.disconnect()
            client.loop_stop()
    assert not acks[own].is_failure and str(acks[other]) == "Not authorized"


def test_receiver_enroll_signs_the_csr_with_the_configured_ca(tmp_path, capsys):
    config = tmp_path / "receiver.toml"
    config.write_text('[receiver]\nstate_dir = "state"\n\n[mqtt]\nhost = "127.0.0.1"\n')
    assert main(["centre", "ca", "init", "--config", str(config)]) == 0
    assert (tmp_path / "state/ca/ca-key.pem").is_file()
    capsys.readouterr()
    argv = ["provision", "--device-id", "cp-8", "--site", "site-b", "--kind", "call-point", "--no-qr", "--csr"]
    assert main([*argv, "--broker", "mqtts://broker.example", "--root", str(tmp_path / "root")]) == 0
    (tmp_path / "record.json").write_text(capsys.readouterr().out)
    cert = tmp_path / "cp-8.pem"
    assert (
        main(["receiver", "enroll", "--config", str(config), str(tmp_path / "record.json"), "--cert-out", str(cert)])
        == 0
    )
    assert "enrolled site-b/cp-8" in capsys.readouterr().out
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    verify_issued(DeviceCA(tmp_path / "state/ca"), issued)
    assert issued.subject.rfc4514_string() == "CN=site-b/cp-8"


def test_mosquitto_runs_the_generated_configuration_as_written(tmp_path, centre):
    """The generated mosquitto.conf itself (allow_anonymous false): a device logs in by certificate alone."""
    ca, _ = centre
    port = free_port()
    out = tmp_path / "written"
    assert (
        main(
            ["centre", "broker-config", "--ca-dir", str(ca.directory), "--out", str(out)]
            + ["--host", "127.0.0.1", "--port", str(port)]
        )
        == 0
    )
    conf = out / "mosquitto.conf"
    if os.geteuid() == 0:  # as root mosquitto would drop to its own user, who cannot read these temp files
        conf.write_text(conf.read_text() + "user root\n")
    executable = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(executable).exists():
        pytest.skip("mosquitto is not installed")
    process = subprocess.Popen([executable, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    a = None
    try:
        broker = SimpleNamespace(host="127.0.0.1", port=port)
        a = Client(broker, out / "ca.pem", *device_identity(tmp_path, ca, "site-a", "cp-1"))
        assert wait_until(lambda: a.connected is not None, 10)
        assert not a.connected.is_failure
        assert not a.publish("edge/site-a/cp-1/alert").is_failure
        assert str(a.publish("edge/site-a/cp-2/alert")) == "Not authorized"
    finally:
        if a is not None:
            a.close()
        process.terminate()
        process.wait(timeout=10)
        process.stderr.close()


@pytest.mark.parametrize(
    "record, why",
    [
        ({"device_id": "cp-1", "site": "site-a"}, "no 'csr'"),
        ({"device_id": "cp-1", "site": "../etc", "csr": "x"}, "not a valid name"),
        ({"device_id": "cp-1", "site": "site-a", "csr": "x" * 9000}, "larger than"),
        ([1, 2], "no 'csr'"),
    ],
)
def test_ca_issue_refuses_hostile_records_with_a_reason(tmp_path, centre, capsys, record, why):
    ca, _ = centre
    before = ca.register()
    (tmp_path / "record.json").write_text(json.dumps(record))
    assert main(["centre", "ca", "issue", "--ca-dir", str(ca.directory), str(tmp_path / "record.json")]) == 2
    assert why in capsys.readouterr().err
    assert ca.register() == before


def test_ca_issue_refuses_an_rsa_csr(centre):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    with pytest.raises(ConfigError, match="not an EC key"):
        centre[0].issue_for_csr(csr.public_bytes(serialization.Encoding.PEM), "site-a/cp-1", "record")
