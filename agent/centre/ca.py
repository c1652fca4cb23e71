"""The centre's device CA: one TLS identity per device at the broker.

A certificate's common name is ``<site>/<device>``. mosquitto, with
``use_identity_as_username true``, takes it as the username, and the ACL
pattern ``<prefix>/%u/alert`` then expands to exactly that device's topics; a
device can neither write another device's alerts nor read its acks. Device
keys are made on the device (``provision --csr``): the centre only ever sees a
certificate signing request. Revoking writes a new CRL that mosquitto reads at
start (``crlfile``), so a revocation takes effect when the broker restarts.

Directory layout: ``ca-key.pem`` (0600), ``ca.pem``, ``issued.json`` (serial →
name, validity, revoked) and ``crl.pem``.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import ConfigError
from agent.runtime.files import write_file_atomically

CA_KEY = "ca-key.pem"
CA_CERT = "ca.pem"
ISSUED = "issued.json"
CRL = "crl.pem"
DEVICE_DAYS = 825
CRL_DAYS = 365
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_CSR_BYTES = 8192


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _subject(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def device_identity(site: str, device_id: str) -> str:
    """The certificate common name (and so the broker username) of a device."""
    for what, value in (("site", site), ("device_id", device_id)):
        if not isinstance(value, str) or not _NAME.match(value):
            raise ConfigError(f"{what} {value!r} is not a valid name (letters, digits, _ . -)")
    return f"{site}/{device_id}"


def write_private(path: Path, data: bytes) -> None:
    """A secret: never readable by others, whatever the umask."""
    write_file_atomically(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    write_file_atomically(path, data, 0o644)


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_csr(pem: str | bytes, where: str) -> x509.CertificateSigningRequest:
    """A CSR from an untrusted record: bounded, parseable, signed by its own key (proof of possession)."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_BYTES:
        raise ConfigError(f"{where}: the CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{where}: not a PEM certificate signing request: {exc}") from None
    if not valid:
        raise ConfigError(f"{where}: the CSR's signature does not verify")
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.key_size < 256:
        raise ConfigError(f"{where}: the CSR's key is not an EC key of at least 256 bits")
    return csr


@dataclass(frozen=True)
class Issued:
    serial: int
    name: str
    not_after: str
    revoked: str | None = None


class DeviceCA:
    """The CA directory: create it, issue device/server/receiver certificates, revoke, keep the CRL current."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL

    def init(self, name: str = "edge-agent device CA", days: int = 3650, force: bool = False) -> x509.Certificate:
        """Create the CA key (0600), its self-signed certificate, an empty register and CRL."""
        if (self.directory / CA_KEY).exists() and not force:
            raise ConfigError(f"{self.directory / CA_KEY} already exists; refusing to replace the CA (use --force)")
        self.directory.mkdir(parents=True, exist_ok=True)  # mosquitto reads crl.pem here; the key is 0600
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_subject(name))
            .issuer_name(_subject(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(self.directory / CA_KEY, pem_key(key))
        write_public(self.cert_path, pem_cert(cert))
        self._save_register([])
        self.write_crl()
        return cert

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        try:
            key = serialization.load_pem_private_key((self.directory / CA_KEY).read_bytes(), None)
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"no device CA in {self.directory}; run 'edge-agent centre ca init' first") from None
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"{self.directory}: unreadable CA key or certificate: {exc}") from None
        return key, cert

    def register(self) -> list[Issued]:
        path = self.directory / ISSUED
        try:
            return [Issued(**entry) for entry in json.loads(path.read_text())]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not a register of issued certificates: {exc}") from None

    def _save_register(self, entries: list[Issued]) -> None:
        text = json.dumps([entry.__dict__ for entry in entries], indent=2) + "\n"
        write_public(self.directory / ISSUED, text.encode())

    def _sign(self, common_name: str, public_key, days: int, server_names: list[str] | None = None) -> x509.Certificate:
        ca_key, ca_cert = self._load()
        now = _now()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_subject(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if server_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(server_names)), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        entries = self.register()
        entries.append(Issued(cert.serial_number, common_name, cert.not_valid_after_utc.isoformat()))
        self._save_register(entries)
        return cert

    def issue_for_csr(self, csr_pem: str | bytes, common_name: str, where: str, days: int = DEVICE_DAYS):
        """Sign a device's CSR under ``common_name`` (the CSR's own subject is ignored)."""
        csr = load_csr(csr_pem, where)
        return self._sign(common_name, csr.public_key(), days)

    def issue_with_key(
        self, common_name: str, days: int = DEVICE_DAYS, server_names: list[str] | None = None
    ) -> tuple[bytes, x509.Certificate]:
        """Key and certificate made here, for the centre's own parts (the broker's server, the receiver)."""
        key = ec.generate_private_key(ec.SECP256R1())
        return pem_key(key), self._sign(common_name, key.public_key(), days, server_names)

    def revoke(self, which: str) -> list[Issued]:
        """Revoke by serial (decimal or 0x-hex) or by name (every certificate of it); rewrites the CRL."""
        entries = self.register()
        now = _now().isoformat()
        hit = []
        for i, entry in enumerate(entries):
            if entry.revoked is None and (entry.name == which or _serial_matches(which, entry.serial)):
                entries[i] = Issued(entry.serial, entry.name, entry.not_after, now)
                hit.append(entries[i])
        if not hit:
            raise ConfigError(f"no unrevoked certificate with serial or name {which!r} in {self.directory / ISSUED}")
        self._save_register(entries)
        self.write_crl()
        return hit

    def write_crl(self, days: int = CRL_DAYS) -> x509.CertificateRevocationList:
        """The CRL of every revoked serial, valid ``days`` (mosquitto refuses everyone once it has expired)."""
        ca_key, ca_cert = self._load()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=days))
        )
        for entry in self.register():
            if entry.revoked is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(entry.serial)
                    .revocation_date(datetime.datetime.fromisoformat(entry.revoked))
                    .build()
                )
        crl = builder.sign(ca_key, hashes.SHA256())
        write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return crl


def _serial_matches(which: str, serial: int) -> bool:
    try:
        return int(which, 16 if which.lower().startswith("0x") else 10) == serial
    except ValueError:
        return False


def _alt_names(names: list[str]) -> list[x509.GeneralName]:
    import ipaddress

    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def verify_issued(ca: DeviceCA, cert: x509.Certificate) -> None:
    """Raise if ``cert`` was not signed by this CA (what an operator or a test checks an issued certificate with)."""
    _, ca_cert = ca._load()
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(f"certificate not issued by {ca.cert_path}: {exc}") from None


#: The common name of the shared bootstrap certificate that unenrolled devices connect with.
BOOTSTRAP_NAME = "enrolment"
DEVICE_WRITES = ("alert", "event", "telemetry", "status", "evidence")
DEVICE_READS = ("ack", "evidence-request", "config", "command", "update")
RECEIVER_READS = ("alert", "event", "telemetry", "status", "evidence")
RECEIVER_WRITES = ("ack", "evidence-request", "config", "command", "update")


def acl_text(prefix: str, receiver_name: str) -> str:
    """The mosquitto ACL: each device its own topics by pattern (``%u`` = ``site/device``), the receiver its set."""
    prefix = prefix.strip("/")
    if not prefix or any(c in prefix for c in "+#\n\r\t ") or "%" in prefix:
        raise ConfigError(f"topic prefix {prefix!r}: no wildcards, %, spaces or empty prefix in an ACL")
    if not _NAME.match(receiver_name):
        raise ConfigError(f"receiver name {receiver_name!r}: letters, digits, _ . - only (no '/')")
    lines = [
        "# Written by 'edge-agent centre broker-config'. The broker username is the certificate's common name:",
        "# '<site>/<device>' for a device, so '%u' below expands to the device's own place in the topic tree.",
        "# A pattern applies to every user; the receiver's name has no '/', so no pattern reaches a device topic.",
    ]
    lines += [f"pattern write {prefix}/%u/{channel}" for channel in DEVICE_WRITES]
    lines += [f"pattern read {prefix}/%u/{channel}" for channel in DEVICE_READS]
    lines += [
        "# Zero-touch enrolment: any client (the shared bootstrap identity 'enrolment' included) may ask to enrol",
        "# under its own client id ('%c') and read only its own answer; the bootstrap identity can do nothing else.",
        f"pattern write {prefix}/_enrol/%c/request",
        f"pattern read {prefix}/_enrol/%c/result",
    ]
    lines += ["", f"user {receiver_name}"]
    lines += [f"topic read {prefix}/+/+/{channel}" for channel in RECEIVER_READS]
    lines += [f"topic write {prefix}/+/+/{channel}" for channel in RECEIVER_WRITES]
    lines += [f"topic read {prefix}/_enrol/+/request", f"topic write {prefix}/_enrol/+/result"]
    return "\n".join(lines) + "\n"


def listener_lines(directory: Path, crl_file: Path) -> str:
    """TLS listener options: client certificates required, their common name is the username, CRL checked."""
    return (
        f"cafile {directory / 'ca.pem'}\ncertfile {directory / 'server.pem'}\nkeyfile {directory / 'server-key.pem'}\n"
        f"crlfile {crl_file}\nrequire_certificate true\nuse_identity_as_username true\n"
    )


def write_broker_config(
    ca: DeviceCA,
    out: Path,
    prefix: str = "edge",
    receiver_name: str = "centre-receiver",
    hosts: tuple[str, ...] = ("localhost",),
    port: int = 8883,
) -> Path:
    """mosquitto.conf, acl, the CA, a server certificate for ``hosts`` and the receiver's client certificate."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    acl = acl_text(prefix, receiver_name)
    server_key, server_cert = ca.issue_with_key(hosts[0], days=DEVICE_DAYS, server_names=list(hosts))
    receiver_key, receiver_cert = ca.issue_with_key(receiver_name)
    write_public(out / "ca.pem", ca.cert_path.read_bytes())
    write_private(out / "server-key.pem", server_key)
    write_public(out / "server.pem", pem_cert(server_cert))
    write_private(out / "receiver-key.pem", receiver_key)
    write_public(out / "receiver.pem", pem_cert(receiver_cert))
    write_public(out / "acl", acl.encode())
    # The shared bootstrap identity for zero-touch enrolment: on every card, so it may only ask to enrol (see acl).
    bootstrap_key, bootstrap_cert = ca.issue_with_key(BOOTSTRAP_NAME)
    write_private(out / "enrolment-key.pem", bootstrap_key)
    write_public(out / "enrolment.pem", pem_cert(bootstrap_cert))
    conf = (
        "# Written by 'edge-agent centre broker-config'. One identity per device: see acl.\n"
        "per_listener_settings false\nallow_anonymous false\n"
        "# Announce no Receive Maximum (mosquitto's default is 20): the receiver answers every message it\n"
        "# takes, so it may have as many acks in flight as its own Receive Maximum lets it take.\n"
        "max_inflight_messages 0\n"
        f"acl_file {out / 'acl'}\n\nlistener {port}\n" + listener_lines(out, ca.crl_path.resolve())
    )
    write_public(out / "mosquitto.conf", conf.encode())
    return out / "mosquitto.conf"
