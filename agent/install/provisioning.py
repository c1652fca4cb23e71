"""``edge-agent provision``: a box goes from blank to enrol-able in one command.

Creates the device key (never replacing one without ``force``), writes a
config from the template of the device's kind and validates it, installs the
centre's public keys (the JWK Set ``receiver init`` prints, or its signing JWK
alone) and the broker's TLS files and password into the root-only credentials
directory, writes the systemd drop-in that hands exactly those credentials to
the service (``LoadCredential=``), and returns the enrolment record the
installer scans into the centre's registry (printed as JSON and as a terminal
QR code).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from agent.config.centre import ReceiverConfig
from agent.config.device import AgentConfig, load_agent_config
from agent.config.secrets import credential_files
from agent.device.evidence_server import require_sealing_key
from agent.errors import ConfigError, KeyFileError
from agent.protocol.enrolment import Position, enrolment_record, parse_position
from agent.protocol.sealing import load_centre_keys
from agent.protocol.signing import generate_private_key
from agent.runtime.files import write_file_atomically

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
SYSTEMD_DIR = Path("/etc/systemd/system")
DROPIN_NAME = "credentials.conf"
_CREDENTIAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class ProvisionRequest:
    device_id: str
    site: str
    kind: str
    broker: str
    root: Path = Path("/")
    location: str = ""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    centre_key: Path | None = None
    camera: str = "picamera2"
    force: bool = False
    csr: bool = False  # make the TLS client key here and put a CSR in the record (the key never leaves the box)
    lat: float | None = None  # WGS84 degrees, for the centre's map
    lon: float | None = None
    plan: str | None = None  # a site plan's name, with x/y on it
    plan_x: float | None = None
    plan_y: float | None = None

    def position(self) -> Position | None:
        """The map position given, checked as the centre will check it; a ConfigError naming the flags."""
        given = {"lat": self.lat, "lon": self.lon, "plan": self.plan, "x": self.plan_x, "y": self.plan_y}
        if all(v is None for v in given.values()):
            return None
        try:
            return parse_position({k: v for k, v in given.items() if v is not None}, "--lat/--lon/--plan-x/--plan-y")
        except KeyFileError as exc:
            raise ConfigError(str(exc)) from None


def parse_broker(url: str) -> tuple[str, int, bool]:
    """``mqtts://host[:port]`` (TLS, 8883) or ``mqtt://host[:port]`` (1883) → host, port, tls."""
    parts = urlsplit(url if "://" in url else f"mqtts://{url}")
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"--broker {url!r}: expected mqtts://host[:port] or mqtt://host[:port]")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"--broker {url!r}: the port is not a number in 1-65535") from None
    return parts.hostname, port, tls


def _mqtt_section(request: ProvisionRequest) -> str:
    host, port, tls = parse_broker(request.broker)
    lines = ["[mqtt]", f'host = "{host}"', f"port = {port}"]
    if request.username:
        lines.append(f'username = "{request.username}"')
    if request.password_file:
        lines.append('password_file = "mqtt-password"')
    lines += ["", "[mqtt.tls]", f"enabled = {'true' if tls else 'false'}"]
    # Plain names, found like every secret: $CREDENTIALS_DIRECTORY (the service), then credentials_dir (root).
    if tls and request.ca_file:
        lines.append('ca_file = "broker-ca.pem"')
    if tls and (request.cert_file or request.csr):
        lines += ['cert_file = "client-cert.pem"', 'key_file = "client-cert-key.pem"']
    return "\n".join(lines) + "\n"


def _check_tls_files(request: ProvisionRequest) -> None:
    """Refuse a CA, certificate or key that TLS could not use, before anything is written."""
    for flag, path in (
        ("--ca-file", request.ca_file),
        ("--cert-file", request.cert_file),
        ("--key-file", request.key_file),
    ):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    try:
        if request.ca_file is not None:
            ssl.create_default_context(cafile=str(request.ca_file))
        if request.cert_file is not None and request.key_file is not None:
            ssl.create_default_context().load_cert_chain(str(request.cert_file), str(request.key_file))
    except (ssl.SSLError, OSError) as exc:
        which = "--ca-file" if request.cert_file is None else "--ca-file/--cert-file/--key-file"
        raise ConfigError(f"{which}: not a usable PEM CA, certificate and key: {exc}") from None


def _install_secret(source: Path, target: Path, mode: int) -> None:
    """Copy a credential so that it never exists with a wider mode than ``mode``, whatever the umask."""
    try:
        write_file_atomically(target, Path(source).read_bytes(), mode)
    except OSError as exc:
        raise ConfigError(f"cannot copy {source} to {target}: {exc.strerror}") from None


def credentials_dropin(config: AgentConfig | ReceiverConfig) -> tuple[str, list[str], list[str]]:
    """A systemd drop-in passing in every credential ``config`` names that exists in its credentials_dir.

    systemd fails a unit whose ``LoadCredential=`` file is missing, so only files present are
    listed. Returns (drop-in text, credential names listed, settings left out and why).
    """
    directory = config.secret_dirs[0]
    listed: list[str] = []
    left_out: list[str] = []
    for setting, name in credential_files(config):
        if name in listed:
            continue
        if not _CREDENTIAL_ID.match(name):
            left_out.append(f"{setting} = {name!r}: not a plain file name; give an absolute path the service can read")
        elif not (directory / name).is_file():
            left_out.append(f"{setting} = {name!r}: not in {directory}")
        else:
            listed.append(name)
    path = str(directory).replace("%", "%%")  # systemd expands % specifiers
    text = (
        f"# Written by edge-agent: the credentials the configuration names that exist in {directory}.\n"
        "# systemd fails a unit whose LoadCredential= file is missing, so only those present are listed;\n"
        "# after adding or removing one, run 'edge-agent config credentials CONFIG' again.\n"
        "[Service]\n" + "".join(f"LoadCredential={name}:{path}/{name}\n" for name in listed)
    )
    return text, listed, left_out


def write_credentials_dropin(
    config: AgentConfig | ReceiverConfig, unit: str, unit_dir: Path = SYSTEMD_DIR
) -> tuple[Path, list[str], list[str]]:
    """Write ``unit_dir/unit.d/credentials.conf``; returns (its path, names listed, settings left out)."""
    text, listed, left_out = credentials_dropin(config)
    target = Path(unit_dir) / f"{unit}.d" / DROPIN_NAME
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(DROPIN_NAME + ".new")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        raise ConfigError(f"cannot write the credentials drop-in {target}: {exc.strerror}") from None
    return target, listed, left_out


def reload_systemd(unit_dir: Path) -> str | None:
    """``systemctl daemon-reload`` when ``unit_dir`` is the live one and systemd runs; returns why it failed."""
    if Path(unit_dir) != SYSTEMD_DIR or not Path("/run/systemd/system").is_dir() or not shutil.which("systemctl"):
        return None
    try:
        result = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"systemctl daemon-reload failed: {exc}; run it before starting the service"
    if result.returncode != 0:
        return f"systemctl daemon-reload failed: {result.stderr.strip()}; run it before starting the service"
    return None


def _check_centre_keys(path: Path, config: AgentConfig) -> None:
    """The centre's key set (or its signing JWK alone), and nothing else; evidence needs its encryption key."""
    centre_keys = load_centre_keys(path)
    require_sealing_key(config.rules, centre_keys)
    if config.camera is not None and centre_keys.encryption is None:
        log.warning("%s has no encryption key: this camera box cannot send evidence images", path)


def provision(request: ProvisionRequest) -> tuple[dict, Path]:
    """Write key, config and centre key under ``request.root``; returns (enrolment record, config path)."""
    root = Path(request.root)
    config_path = root / "etc/edge-agent/agent.toml"
    credentials = root / "etc/edge-agent/credentials"
    state_dir = root / "var/lib/edge-agent"
    key_path = credentials / "device-key.pem"
    if key_path.exists() and not request.force:
        raise KeyFileError(f"{key_path} already exists; refusing to replace a device identity (use --force)")
    if request.kind not in ("call-point", "building-button", "camera-box"):
        raise ConfigError(f"--kind {request.kind!r}: expected call-point, building-button or camera-box")
    if (request.cert_file is None) != (request.key_file is None):
        raise ConfigError("--cert-file and --key-file must be given together")
    if request.csr and (request.cert_file is not None or not parse_broker(request.broker)[2]):
        raise ConfigError("--csr makes the client key here: it needs an mqtts:// broker and no --cert-file/--key-file")
    _check_tls_files(request)
    position = request.position()
    credentials.mkdir(parents=True, exist_ok=True, mode=0o700)
    state_dir.mkdir(parents=True, exist_ok=True)
    text = Template((TEMPLATES / f"{request.kind}.toml").read_text()).substitute(
        device_id=request.device_id,
        site=request.site,
        state_dir=state_dir,
        credentials_dir=credentials,
        location=request.location.replace('"', "'"),
        mqtt=_mqtt_section(request),
        camera=request.camera,
        model_dir=state_dir / "models",
    )
    tmp = config_path.with_suffix(".toml.new")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    try:
        config = load_agent_config(tmp)  # never leave an invalid config behind
        if request.centre_key is not None:
            _check_centre_keys(Path(request.centre_key), config)
    except (ConfigError, KeyFileError):
        tmp.unlink()
        raise
    for source, name, mode in (
        (request.ca_file, "broker-ca.pem", 0o644),
        (request.cert_file, "client-cert.pem", 0o644),
        (request.key_file, "client-cert-key.pem", 0o600),
        (request.password_file, "mqtt-password", 0o600),
    ):
        if source is not None:
            _install_secret(Path(source), credentials / name, mode)
    if request.centre_key is not None:
        _install_secret(Path(request.centre_key), credentials / "centre.jwk", 0o644)
    key = generate_private_key(key_path, force=request.force)
    csr = None
    if request.csr:
        csr = tls_key_and_csr(credentials / "client-cert-key.pem", request.site, request.device_id)
    os.replace(tmp, config_path)
    unit_dir = root / "etc/systemd/system"
    write_credentials_dropin(load_agent_config(config_path), "edge-agent.service", unit_dir)
    problem = reload_systemd(unit_dir) if root == Path("/") else None
    if problem is not None:
        log.warning("%s", problem)
    record = enrolment_record(
        request.device_id, request.site, request.kind, key, position=position, location=request.location
    )
    record["fingerprint"] = ":".join(record["kid"][i : i + 4] for i in range(0, 16, 4))
    if csr is not None:
        record["csr"] = csr
    return record, config_path


def tls_key_and_csr(key_path: Path, site: str, device_id: str) -> str:
    """Make the broker TLS key on the device (0600) and return a CSR for ``<site>/<device>``.

    The centre's CA signs it (``edge-agent centre ca issue RECORD``); the certificate it returns
    goes to the credentials directory as ``client-cert.pem``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_file_atomically(key_path, pem, 0o600)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{site}/{device_id}")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def qr_text(record: dict) -> str:
    """The enrolment record as a terminal QR code (the installer scans it with the centre's app)."""
    import io

    import qrcode

    code = qrcode.QRCode(border=1, error_correction=qrcode.constants.ERROR_CORRECT_M)
    code.add_data(json.dumps(record, separators=(",", ":"), sort_keys=True))
    code.make(fit=True)
    out = io.StringIO()
    code.print_ascii(out=out, invert=True)
    return out.getvalue()
