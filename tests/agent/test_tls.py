"""TLS to a real mosquitto: the server certificate is verified, a client certificate can be required."""

import datetime
import ipaddress
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config.mqtt import MqttSection, TlsSection
from agent.mqtt.link import MqttLink
from tests.conftest import wait_until


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(directory, stem, subject, issuer_key=None, issuer_name=None, ca=False, server=False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name or _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}-key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / f"{stem}-key.pem").chmod(0o644)  # mosquitto may drop to its own user
    return key, cert


@pytest.fixture
def pki(tmp_path):
    directory = tmp_path / "pki"
    directory.mkdir()
    directory.chmod(0o755)
    tmp_path.chmod(0o755)
    ca_key, ca = _issue(directory, "ca", "Test Centre CA", ca=True)
    _issue(directory, "server", "127.0.0.1", ca_key, ca.subject, server=True)
    _issue(directory, "client", "cp-1", ca_key, ca.subject)
    _issue(directory, "rogue-ca", "Rogue CA", ca=True)
    return directory


def link_for(broker, tls: TlsSection, tmp_path) -> MqttLink:
    settings = MqttSection(host=broker.host, port=broker.port, tls=tls, reconnect_min_s=0.1, reconnect_max_s=0.5)
    return MqttLink(settings, client_id=f"tls-test-{time.monotonic_ns()}", secret_dirs=(tmp_path,))


def test_verified_server_and_client_certificate_connect(tls_broker, pki, tmp_path):
    tls = TlsSection(
        ca_file=str(pki / "ca.pem"), cert_file=str(pki / "client.pem"), key_file=str(pki / "client-key.pem")
    )
    with link_for(tls_broker, tls, tmp_path) as link:
        link.start()
        assert link.wait_connected(10)
        received = []
        link.on_message = lambda topic, payload: received.append(payload)
        link.subscribe("t/#")
        assert link.wait_subscribed(5)
        link.publish("t/x", b"hello")
        assert wait_until(lambda: received == [b"hello"], 5)


def test_server_not_signed_by_the_configured_ca_is_refused(tls_broker, pki, tmp_path):
    tls = TlsSection(
        ca_file=str(pki / "rogue-ca.pem"), cert_file=str(pki / "client.pem"), key_file=str(pki / "client-key.pem")
    )
    with link_for(tls_broker, tls, tmp_path) as link:
        reason = link.probe(5)
    assert reason is not None and reason.startswith("TLS: the broker's certificate does not verify ("), reason


def test_missing_client_certificate_is_refused_by_the_broker(tls_broker, pki, tmp_path):
    def refusals() -> int:
        return tls_broker.log_path.read_text().count("peer did not return a certificate")

    with link_for(tls_broker, TlsSection(ca_file=str(pki / "ca.pem")), tmp_path) as link:
        link.start()
        assert wait_until(lambda: refusals() >= 2, 10), tls_broker.log_path.read_text()  # refused, and on retry
        assert not link.is_connected
