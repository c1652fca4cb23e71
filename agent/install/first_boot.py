"""``edge-agent enrol-first-boot``: a box flashed from the common image enrols itself with a one-time token.

The installer writes the same image to every card, plus a small enrolment file on the boot
partition (``/boot/firmware/edge-agent-enrol.toml``): site, kind, broker, the centre's public
key set and the broker's CA, the shared enrolment login, and one token from ``edge-agent centre
token create``. No device secret is on the card. At first boot this one-shot:

1. provisions the box (as ``edge-agent provision``): its own Ed25519 key, a TLS key and CSR if
   ``csr = true``, the config from its kind's template; an interrupted attempt is resumed with
   the same key (the record is kept in the state directory);
2. sends the signed request with the token on ``<prefix>/_enrol/<client id>/request``, again every
   ``retry_s`` until the centre's answer (signed with the centre key from the file) arrives;
3. on ``enrolled``: installs the certificate, if one came, and rewrites the enrolment file
   without its token (atomically); on ``pending`` it keeps waiting; on ``refused`` it exits
   with the reason and leaves the file as it is.

The outcome is also written to ``<state_dir>/enrolment.json``. The systemd unit runs it before
``edge-agent.service`` only while the file still holds a token.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.config.mqtt import MqttSection
from agent.errors import ConfigError, KeyFileError, SignatureInvalid, UplinkError
from agent.install.provisioning import ProvisionRequest, parse_broker, provision
from agent.mqtt.link import MqttLink
from agent.protocol.sealing import load_centre_keys, parse_centre_keys
from agent.protocol.signing import MessageSigner, load_private_key, verify_claims
from agent.protocol.zero_touch import TOKEN_PATTERN, EnrolmentResultClaims, enrolment_topic, sign_request
from agent.runtime.files import write_file_atomically

log = logging.getLogger(__name__)

DEFAULT_FILE = Path("/boot/firmware/edge-agent-enrol.toml")
RECORD = "enrolment-record.json"
OUTCOME = "enrolment.json"
_TOKEN_LINE = re.compile(r"^\s*token\s*=.*$\n?", re.MULTILINE)


class EnrolmentFile(BaseModel):
    """What the installer puts on the boot partition; unknown keys are refused (a typo is not ignored)."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    kind: str = Field(pattern=r"^(call-point|building-button|camera-box)$")
    broker: str
    topic_prefix: str = "edge"
    token: str | None = Field(None, pattern=TOKEN_PATTERN)
    centre_keys: str = Field(description="The JSON key set 'edge-agent receiver init' printed.")
    ca_cert: str | None = Field(None, description="The broker's CA certificate (PEM).")
    csr: bool = Field(False, description="Ask the centre's device CA for a client certificate.")
    device_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    location: str = ""
    lat: float | None = None
    lon: float | None = None
    enrol_username: str | None = Field(None, description="The shared enrolment login: it may only ask to enrol.")
    enrol_password: str | None = None
    enrol_cert: str | None = Field(None, description="Or a shared bootstrap client certificate (PEM) ...")
    enrol_key: str | None = Field(None, description="... and its key.")


@dataclass(frozen=True)
class Outcome:
    outcome: str  # enrolled / refused / nothing_to_do
    device_id: str = ""
    reason: str | None = None
    detail: str = ""


def read_enrolment_file(path: Path) -> EnrolmentFile:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        return EnrolmentFile.model_validate(data)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the enrolment file: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None


def first_boot(path: Path, root: Path = Path("/"), timeout_s: float = 600.0, retry_s: float = 30.0) -> Outcome:
    """Provision (or resume), ask the centre, and act on its answer; see the module docstring."""
    enrolment = read_enrolment_file(path)
    if enrolment.token is None:
        return Outcome("nothing_to_do", detail=f"{path} holds no token (this box is enrolled)")
    parse_centre_keys(_json(enrolment.centre_keys, "centre_keys"), f"{path}: centre_keys")
    root = Path(root)
    credentials, state_dir = root / "etc/edge-agent/credentials", root / "var/lib/edge-agent"
    record = _record(enrolment, root, state_dir)
    signer = MessageSigner(load_private_key(credentials / "device-key.pem"))
    outcome = _ask(enrolment, record, signer, credentials, timeout_s, retry_s)
    write_file_atomically(state_dir / OUTCOME, (json.dumps(outcome.__dict__, indent=1) + "\n").encode(), 0o644)
    if outcome.outcome == "enrolled":
        remove_token(path)
    return outcome


def _record(enrolment: EnrolmentFile, root: Path, state_dir: Path) -> dict[str, Any]:
    """The enrolment record (with CSR): from an interrupted attempt, else by provisioning the box now."""
    kept = state_dir / RECORD
    if kept.is_file():
        return json.loads(kept.read_text(encoding="utf-8"))
    if (root / "etc/edge-agent/credentials/device-key.pem").is_file():
        record = _record_of_provisioned(enrolment, root)  # provisioned, then stopped before the record was kept
        write_file_atomically(kept, (json.dumps(record) + "\n").encode(), 0o600)
        return record
    with tempfile.TemporaryDirectory() as scratch:
        centre = Path(scratch) / "centre.jwk"
        centre.write_text(enrolment.centre_keys)
        ca = None
        if enrolment.ca_cert:
            ca = Path(scratch) / "broker-ca.pem"
            ca.write_text(enrolment.ca_cert)
        request = ProvisionRequest(
            device_id=enrolment.device_id or hardware_name(enrolment.kind, root),
            site=enrolment.site,
            kind=enrolment.kind,
            broker=enrolment.broker,
            root=root,
            location=enrolment.location,
            ca_file=ca,
            centre_key=centre,
            csr=enrolment.csr,
            lat=enrolment.lat,
            lon=enrolment.lon,
        )
        record, config_path = provision(request)
    if enrolment.topic_prefix != "edge":
        text = config_path.read_text()
        config_path.write_text(
            re.sub(r"(?m)^(port = \d+)$", rf'\1\ntopic_prefix = "{enrolment.topic_prefix}"', text, count=1)
        )
    write_file_atomically(kept, (json.dumps(record) + "\n").encode(), 0o600)
    return record


def _record_of_provisioned(enrolment: EnrolmentFile, root: Path) -> dict[str, Any]:
    """The record of a box provisioned by an earlier attempt, from its config and key (a new CSR if one is wanted)."""
    from agent.config.device import load_agent_config
    from agent.install.provisioning import tls_key_and_csr
    from agent.protocol.enrolment import Position, enrolment_record

    config = load_agent_config(root / "etc/edge-agent/agent.toml")
    credentials = root / "etc/edge-agent/credentials"
    key = load_private_key(credentials / "device-key.pem")
    location = config.buttons[0].location if config.buttons else ""
    position = Position(enrolment.lat, enrolment.lon) if enrolment.lat is not None else None
    record = enrolment_record(
        config.device.id, config.device.site, config.device.kind, key, position=position, location=location
    )
    if enrolment.csr:
        record["csr"] = tls_key_and_csr(credentials / "client-cert-key.pem", config.device.site, config.device.id)
    return record


def hardware_name(kind: str, root: Path) -> str:
    """``<kind>-<serial>``: the Pi's CPU serial, else the machine id (the image's own is regenerated at first boot)."""
    try:
        for line in (root / "proc/cpuinfo").read_text().splitlines():
            if line.startswith("Serial") and ":" in line:
                return f"{kind}-{line.split(':', 1)[1].strip().lstrip('0')[-12:]}"
    except OSError:
        pass
    try:
        return f"{kind}-{(root / 'etc/machine-id').read_text().strip()[:12]}"
    except OSError:
        raise ConfigError(
            "no device_id in the enrolment file and no CPU serial or machine id to name the box"
        ) from None


def _ask(
    enrolment: EnrolmentFile, record: dict, signer: MessageSigner, credentials: Path, timeout_s: float, retry_s: float
) -> Outcome:
    """Send the request (again every ``retry_s``) until the centre answers enrolled or refused, or ``timeout_s``."""
    device_id = record["device_id"]
    client_id = f"enrol-{device_id}"
    centre_key = load_centre_keys(credentials / "centre.jwk").signing
    link = MqttLink(_enrol_login(enrolment, credentials), client_id, (credentials,), session_expiry_s=0)
    answers: queue.Queue[bytes] = queue.Queue()
    link.on_message = lambda topic, payload: answers.put(payload)
    link.subscribe(enrolment_topic(enrolment.topic_prefix, client_id, "result"), qos=1)
    csr = record.get("csr")
    public = {k: v for k, v in record.items() if k not in ("csr", "fingerprint")}
    token, request_id = sign_request(signer, str(enrolment.token), public, csr)
    deadline = time.monotonic() + timeout_s
    link.start()
    try:
        while time.monotonic() < deadline:
            if link.wait_subscribed(min(retry_s, max(0.0, deadline - time.monotonic()))):
                token, _ = sign_request(signer, str(enrolment.token), public, csr, request_id)  # a fresh send time
                link.publish(enrolment_topic(enrolment.topic_prefix, client_id, "request"), token.encode(), qos=1)
            result = _wait_answer(answers, centre_key, str(request_id), min(retry_s, deadline - time.monotonic()))
            if result is None or result.outcome == "pending" or result.reason == "internal_error":
                if result is not None:
                    log.info("enrolment of %s: %s %s, asking again", device_id, result.outcome, result.detail)
                continue
            if result.outcome == "enrolled" and result.cert:
                write_file_atomically(credentials / "client-cert.pem", result.cert.encode(), 0o644)
            return Outcome(result.outcome, device_id, result.reason, result.detail)
    finally:
        link.close()
    raise UplinkError(f"no answer from the centre to the enrolment request within {timeout_s:g} s")


def _wait_answer(
    answers: queue.Queue[bytes], centre_key, request_id: str, wait_s: float
) -> EnrolmentResultClaims | None:
    """The centre's answer to this request, verified with the centre's key; anything else is dropped."""
    deadline = time.monotonic() + max(0.0, wait_s)
    while (left := deadline - time.monotonic()) > 0:
        try:
            payload = answers.get(timeout=left)
        except queue.Empty:
            return None
        try:
            result = verify_claims(EnrolmentResultClaims, payload, centre_key)
        except SignatureInvalid as exc:
            log.warning("dropped an enrolment answer that is not the centre's: %s", exc)
            continue
        if str(result.request_id) == request_id:
            return result
    return None


def _enrol_login(enrolment: EnrolmentFile, credentials: Path) -> MqttSection:
    """The broker connection for enrolling: the shared enrolment login (password or bootstrap certificate)."""
    host, port, tls = parse_broker(enrolment.broker)
    settings: dict[str, Any] = {"host": host, "port": port, "topic_prefix": enrolment.topic_prefix}
    tls_section: dict[str, Any] = {"enabled": tls}
    if tls and enrolment.ca_cert:
        tls_section["ca_file"] = "broker-ca.pem"  # installed by provisioning
    for name, value, mode in (
        ("enrol-password", enrolment.enrol_password, 0o600),
        ("enrol-cert.pem", enrolment.enrol_cert, 0o644),
        ("enrol-key.pem", enrolment.enrol_key, 0o600),
    ):
        if value:
            write_file_atomically(credentials / name, value.encode(), mode)
    if enrolment.enrol_username:
        settings["username"] = enrolment.enrol_username
        settings["password_file"] = "enrol-password" if enrolment.enrol_password else None
    if enrolment.enrol_cert and enrolment.enrol_key:
        tls_section |= {"cert_file": "enrol-cert.pem", "key_file": "enrol-key.pem"}
    return MqttSection.model_validate({**settings, "tls": tls_section})


def remove_token(path: Path) -> None:
    """Rewrite the enrolment file without its token line, in one step; checked by reading it back."""
    text = Path(path).read_text(encoding="utf-8")
    stripped = _TOKEN_LINE.sub("", text)
    if "token" in tomllib.loads(stripped):
        raise ConfigError(f'{path}: could not remove the token (write it as one line: token = "...")')
    replace_on_boot_partition(Path(path), stripped.encode())


def replace_on_boot_partition(path: Path, data: bytes) -> None:
    """Write a temporary file beside ``path``, sync it, rename it over ``path``, sync the directory.

    No chmod: the boot partition is FAT, where changing permission bits fails (EPERM) and means nothing.
    A power cut leaves the old file or the new one, never a half-written one.
    """
    tmp = path.with_name(path.name + ".new")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise KeyFileError(f"{what} is not JSON: {exc}") from None
