"""``edge-agent provision``: a box goes from blank to enrol-able in one command.

Creates the device key (never replacing one without ``force``), writes a
config from the template of the device's kind and validates it, installs the
centre's public keys (the JWK Set ``receiver init`` prints, or its signing JWK
alone), and returns the enrolment record the installer scans into the centre's
registry (printed as JSON and as a terminal QR code).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from .config import AgentConfig, load_agent_config
from .errors import ConfigError, KeyFileError
from .evidence_transfer import require_sealing_key
from .keyring import enrolment_record
from .sealing import load_centre_keys
from .signing import generate_private_key

TEMPLATES = Path(__file__).with_name("templates")
log = logging.getLogger(__name__)


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


def _mqtt_section(request: ProvisionRequest, credentials: Path) -> str:
    host, port, tls = parse_broker(request.broker)
    lines = ["[mqtt]", f'host = "{host}"', f"port = {port}"]
    if request.username:
        lines.append(f'username = "{request.username}"')
    if request.password_file:
        lines.append('password_file = "mqtt-password"')
    lines += ["", "[mqtt.tls]", f"enabled = {'true' if tls else 'false'}"]
    if tls and request.ca_file:
        lines.append(f'ca_file = "{credentials / "broker-ca.pem"}"')
    if tls and request.cert_file:
        lines += [f'cert_file = "{credentials / "client-cert.pem"}"', 'key_file = "client-cert-key.pem"']
    return "\n".join(lines) + "\n"


def _install_secret(source: Path, target: Path, mode: int) -> None:
    try:
        shutil.copyfile(source, target)
    except OSError as exc:
        raise ConfigError(f"cannot copy {source} to {target}: {exc.strerror}") from None
    os.chmod(target, mode)


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
    credentials.mkdir(parents=True, exist_ok=True, mode=0o700)
    state_dir.mkdir(parents=True, exist_ok=True)
    text = Template((TEMPLATES / f"{request.kind}.toml").read_text()).substitute(
        device_id=request.device_id,
        site=request.site,
        state_dir=state_dir,
        credentials_dir=credentials,
        location=request.location.replace('"', "'"),
        mqtt=_mqtt_section(request, credentials),
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
    os.replace(tmp, config_path)
    record = enrolment_record(request.device_id, request.site, request.kind, key)
    record["fingerprint"] = ":".join(record["kid"][i : i + 4] for i in range(0, 16, 4))
    return record, config_path


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
