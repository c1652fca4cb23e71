"""Typed, validated device and receiver configuration read from one TOML file.

Unknown keys, wrong types and impossible values are refused with the key
path, the offending value and a hint, so an installer on a ladder learns what
to fix from one run of ``edge-agent config check``. Secrets never live in the
file: it names files (every setting ending in ``_file``), found in
``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``), then
``credentials_dir``, then the state directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, ValidationInfo, model_validator

from .config_base import Name, Section
from .config_errors import describe_validation_error
from .config_vision import CameraSection, VisionConfig, VisionSettings
from .errors import ConfigError


def _relative_to_config(value: Path, info: ValidationInfo) -> Path:
    """Relative paths in a config file mean relative to that file, not to the current directory."""
    base = (info.context or {}).get("base_dir")
    return value if value.is_absolute() or base is None else (Path(base) / value).resolve()


ConfigRelativePath = Annotated[Path, AfterValidator(_relative_to_config)]
PinName = Annotated[
    int | str,
    Field(description="GPIO line: a BCM number (17) or a gpiozero pin name ('GPIO17', 'BOARD11')."),
]


class DeviceSection(Section):
    id: Name = Field(description="Device id as enrolled at the centre; also the MQTT topic level.")
    site: Name = Field(description="Site the device belongs to; an MQTT topic level.")
    kind: Literal["call-point", "building-button", "camera-box"] = Field(description="What this box is.")
    state_dir: ConfigRelativePath = Field(
        Path("/var/lib/edge-agent"),
        description="Writable directory for the outbox and control socket (systemd StateDirectory=).",
    )
    credentials_dir: ConfigRelativePath = Field(
        Path("/etc/edge-agent/credentials"),
        description="Where keys and passwords live (root-only); systemd hands them over with LoadCredential=.",
    )


class IdentitySection(Section):
    private_key_file: str = Field(
        "device-key.pem",
        description="Ed25519 private key (PEM). Relative names are looked up in $CREDENTIALS_DIRECTORY, then state_dir.",
    )
    centre_key_file: str = Field(
        "centre.jwk",
        description="The centre's public keys as printed by 'receiver init': a JWK Set {keys: [sig, enc]} "
        "(the enc key seals evidence images for the centre), or its single signing JWK on devices without "
        "evidence. Same lookup as private_key_file.",
    )


class TlsSection(Section):
    enabled: bool = Field(True, description="Use TLS with server certificate verification.")
    ca_file: str | None = Field(
        None,
        description="CA bundle (PEM) for the broker; the system store when unset. A relative name is looked up "
        "like a secret: $CREDENTIALS_DIRECTORY, then credentials_dir, then state_dir.",
    )
    cert_file: str | None = Field(None, description="Client certificate (PEM) for mutual TLS; looked up like ca_file.")
    key_file: str | None = Field(
        None, description="Client certificate key (PEM) for mutual TLS; a secret file, looked up like ca_file."
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsSection:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together for a client certificate")
        return self


class MqttSection(Section):
    host: str = Field(min_length=1, description="Broker host name or address.")
    port: int = Field(8883, ge=1, le=65535, description="Broker port (8883 for TLS, 1883 plain).")
    topic_prefix: str = Field(
        "edge", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", description="First topic levels."
    )
    keepalive_s: int = Field(30, ge=5, le=300, description="MQTT keep-alive; path loss is noticed within 1.5x this.")
    client_id: str | None = Field(None, description="MQTT client id; the device id when unset.")
    username: str | None = Field(None, description="Broker user name.")
    password_file: str | None = Field(
        None, description="File holding the broker password (never inline); looked up like tls.ca_file."
    )
    reconnect_min_s: float = Field(0.5, gt=0, le=60, description="First reconnect delay.")
    reconnect_max_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="Cap of the exponential reconnect delay: low, so the first resend after an outage is prompt.",
    )
    tls: TlsSection = Field(default_factory=TlsSection)

    @model_validator(mode="after")
    def _consistent(self) -> MqttSection:
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file must be given with username")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s ({self.reconnect_min_s}) must not exceed reconnect_max_s ({self.reconnect_max_s})"
            )
        return self


class OutboxSection(Section):
    path: str = Field("outbox.sqlite", description="SQLite file, relative to state_dir.")
    capacity: int = Field(10_000, ge=100, le=1_000_000, description="Messages held; telemetry is dropped first.")
    ack_retry_s: float = Field(
        15.0, ge=1, le=3600, description="Resend an alert the centre has not acknowledged after this long."
    )
    reserve_kb: int = Field(
        4096,
        ge=0,
        le=1_048_576,
        description="Disk space (KiB) set aside at start, with real blocks, so alerts can still be stored when "
        "the disk is full; given back step by step on a full disk, set aside again when room returns. 0: none.",
    )


class ButtonSection(Section):
    name: Name = Field(description="Button name, used by test-alert --button and in alerts.")
    pin: PinName
    alert_kind: Name = Field("assistance", description="Alert kind sent for this button (assistance, duress, fire…).")
    location: str = Field("", max_length=200, description="Where the button is mounted, shown at the centre.")
    activation: Literal["press", "hold", "multi-press"] = Field("press", description="What counts as a press.")
    hold_s: float = Field(2.0, ge=0.1, le=10, description="Hold time for activation = 'hold'.")
    presses: int = Field(3, ge=2, le=10, description="Presses needed for activation = 'multi-press'.")
    window_s: float = Field(2.0, ge=0.2, le=10, description="Window the presses must fall in.")
    bounce_ms: int = Field(30, ge=0, le=500, description="Edges closer than this after an accepted edge are bounce.")
    silent: bool = Field(False, description="Duress: no LED or buzzer change when this button alerts.")
    pull_up: bool = Field(True, description="Button connects the pin to ground (internal pull-up).")


class TamperSection(Section):
    pin: PinName
    pull_up: bool = Field(True, description="Switch connects the pin to ground (internal pull-up).")
    closed_when_pressed: bool = Field(
        True, description="The switch is pressed (closed) while the enclosure is shut: releasing it means opened."
    )


class IndicatorSection(Section):
    led_pin: PinName | None = Field(None, description="Status LED.")
    buzzer_pin: PinName | None = Field(None, description="Optional buzzer.")
    ack_display_s: float = Field(10.0, ge=1, le=600, description="How long 'acknowledged' is shown.")


class ControlSection(Section):
    socket: str = Field("control.sock", description="UNIX socket for status and test-alert, relative to state_dir.")


class TelemetrySection(Section):
    interval_s: float = Field(30.0, ge=5, le=3600, description="Heartbeat interval.")


class AgentConfig(VisionSettings):
    """A device's whole configuration."""

    device: DeviceSection
    identity: IdentitySection = Field(default_factory=IdentitySection)
    mqtt: MqttSection
    outbox: OutboxSection = Field(default_factory=OutboxSection)
    buttons: list[ButtonSection] = Field(default_factory=list)
    tamper: TamperSection | None = None
    indicator: IndicatorSection = Field(default_factory=IndicatorSection)
    control: ControlSection = Field(default_factory=ControlSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    # Camera boxes: the vision pipeline's sections come from VisionSettings; no camera on call points.
    camera: CameraSection | None = None
    source_sha256: str = Field("", exclude=True, description="Hash of the file this came from (set by the loader).")

    @model_validator(mode="after")
    def _hardware_consistent(self) -> AgentConfig:
        if self.device.kind != "camera-box" and not self.buttons:
            raise ValueError(f"a {self.device.kind} needs at least one [[buttons]] entry")
        if self.device.kind == "camera-box" and self.camera is None:
            raise ValueError("a camera-box needs a [camera] section")
        if self.camera is not None:
            self.vision_config()  # cross-references (rule → zone) are checked there
        names = [b.name for b in self.buttons]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"button names must be unique; repeated: {', '.join(duplicates)}")
        used: dict[str, str] = {}
        for owner, pin in self._pins():
            key = _pin_key(pin)
            if key in used:
                raise ValueError(f"pin {pin!r} is used by both {used[key]} and {owner}")
            used[key] = owner
        return self

    def _pins(self) -> list[tuple[str, int | str]]:
        pins: list[tuple[str, int | str]] = [(f"button '{b.name}'", b.pin) for b in self.buttons]
        if self.tamper is not None:
            pins.append(("tamper", self.tamper.pin))
        for what in ("led_pin", "buzzer_pin"):
            pin = getattr(self.indicator, what)
            if pin is not None:
                pins.append((f"indicator.{what}", pin))
        return pins

    def vision_config(self) -> VisionConfig | None:
        """The vision pipeline's settings, or None on a device without a camera."""
        if self.camera is None:
            return None
        return VisionConfig(camera=self.camera, **{name: getattr(self, name) for name in VisionSettings.model_fields})

    @property
    def model_dir(self) -> Path:
        return self.state_dir / self.detector.model_dir

    @property
    def evidence_dir(self) -> Path:
        return self.state_dir / self.evidence.dir

    @property
    def state_dir(self) -> Path:
        return self.device.state_dir

    @property
    def secret_dirs(self) -> tuple[Path, ...]:
        """Where secret files are looked for, after $CREDENTIALS_DIRECTORY; keys are created in the first."""
        return (self.device.credentials_dir, self.state_dir)

    def camera_login(self) -> dict[str, str | None]:
        """``username``/``password`` options for ``open_camera``, the password read from its secret file.

        Raises ConfigError naming the file and the setting when the password cannot be read.
        """
        camera = self.camera
        if camera is None or camera.username is None:
            return {}
        password = None
        if camera.password_file is not None:
            password = read_secret(camera.password_file, self.secret_dirs, "camera.password_file")
        return {"username": camera.username, "password": password}

    @property
    def outbox_path(self) -> Path:
        return self.state_dir / self.outbox.path

    @property
    def control_socket(self) -> Path:
        return self.state_dir / self.control.socket

    def button(self, name: str) -> ButtonSection:
        for button in self.buttons:
            if button.name == name:
                return button
        known = ", ".join(b.name for b in self.buttons) or "none"
        raise ConfigError(f"no button named {name!r}; configured buttons: {known}")


class ReceiverSection(Section):
    id: Name = Field("centre", description="Receiver id, put in acknowledgements.")
    state_dir: ConfigRelativePath = Field(
        Path("/var/lib/edge-agent-receiver"), description="Database, keyring and keys."
    )
    credentials_dir: ConfigRelativePath = Field(
        Path("/etc/edge-agent/credentials"), description="Where the centre's key and passwords live."
    )
    keyring_dir: str = Field("keyring", description="Directory of enrolled device keys, relative to state_dir.")
    database: str = Field("receiver.sqlite", description="Accepted messages, relative to state_dir.")
    signing_key_file: str = Field("centre-key.pem", description="The centre's Ed25519 key for acknowledgements.")
    encryption_key_file: str = Field(
        "centre-enc-key.pem", description="The centre's X25519 key; devices encrypt evidence images for it."
    )
    share_group: Name = Field("centre", description="MQTT 5 shared-subscription group; receivers share the load.")
    window_past_s: float = Field(40.0, gt=0, le=3600, description="Oldest accepted send time (SIA DC-09: 40 s).")
    window_future_s: float = Field(20.0, gt=0, le=3600, description="Furthest accepted future send time (20 s).")
    supervision_s: float = Field(
        90.0, ge=10, le=3600, description="A device silent this long is reported missing (EN 50136: 20-90 s)."
    )
    retention_days: float = Field(
        90.0, ge=1, le=3650, description="Stored messages and device events older than this are deleted."
    )
    session_expiry_s: int = Field(
        10,
        ge=0,
        le=86400,
        description="How long the broker keeps a crashed receiver's session (and its share of the group) waiting.",
    )
    max_inflight: int = Field(
        200, ge=1, le=65535, description="Messages taken from the broker but not yet stored (MQTT Receive Maximum)."
    )


class ReceiverConfig(Section):
    receiver: ReceiverSection = Field(default_factory=ReceiverSection)
    mqtt: MqttSection

    @property
    def secret_dirs(self) -> tuple[Path, ...]:
        return (self.receiver.credentials_dir, self.receiver.state_dir)

    @property
    def keyring_path(self) -> Path:
        return self.receiver.state_dir / self.receiver.keyring_dir

    @property
    def database_path(self) -> Path:
        return self.receiver.state_dir / self.receiver.database


def _pin_key(pin: int | str) -> str:
    text = str(pin).upper()
    return f"GPIO{text}" if text.isdigit() else re.sub(r"^BCM", "GPIO", text)


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _load(path: Path | str, model: type[Section]) -> Any:
    path = Path(path)
    text, data = _read_toml(path)
    try:
        config = model.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        problems = describe_validation_error(exc, text, str(path), model)
        raise ConfigError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(problems), problems) from None
    if isinstance(config, AgentConfig):
        config = config.model_copy(update={"source_sha256": hashlib.sha256(text.encode()).hexdigest()})
    return config


def load_agent_config(path: Path | str) -> AgentConfig:
    """Read and validate a device configuration; raises ConfigError listing every problem."""
    return _load(path, AgentConfig)


def load_receiver_config(path: Path | str) -> ReceiverConfig:
    """Read and validate a receiver configuration; raises ConfigError listing every problem."""
    return _load(path, ReceiverConfig)


def resolve_secret(name: str, *dirs: Path) -> Path:
    """Find a secret file: absolute as given, else in ``$CREDENTIALS_DIRECTORY`` (systemd
    ``LoadCredential=``), else in the first of ``dirs`` holding it, else where it belongs (``dirs[0]``)."""
    path = Path(name)
    if path.is_absolute():
        return path
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and _exists(Path(credentials) / path):
        return Path(credentials) / path
    for directory in dirs:
        if _exists(directory / path):
            return directory / path
    return dirs[0] / path


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a directory the service user may not enter (the root-only one) counts as no."""
    try:
        return path.exists()
    except OSError:
        return False


def secret_file(name: str, dirs: tuple[Path, ...], setting: str) -> Path:
    """The path of a credential file (see ``resolve_secret``) once it is known to be readable.

    Raises ConfigError, one line naming the setting and the file, when it is missing or
    unreadable (the service user cannot read the root-only credentials directory: systemd
    must hand the file over with ``LoadCredential=``).
    """
    path = resolve_secret(name, *dirs)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(_unreadable(name, path, setting, exc)) from None
    return path


def read_secret(name: str, dirs: tuple[Path, ...], what: str) -> str:
    """Read a one-line secret (a password), naming the file and setting when it is missing."""
    path = resolve_secret(name, *dirs)
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(_unreadable(name, path, what, exc)) from None


def _unreadable(name: str, path: Path, setting: str, exc: Exception) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = f"{setting}: cannot read {path}: {reason}"
    if isinstance(exc, PermissionError) and not Path(name).is_absolute():
        text += " (a service reads credentials from $CREDENTIALS_DIRECTORY: run 'edge-agent config credentials')"
    return text


def credential_files(config: Section) -> list[tuple[str, str]]:
    """Every credential a configuration names by a plain relative file name, as (setting, name).

    These are the settings ending in ``_file`` (keys, the centre's key, passwords, TLS files);
    they are what a systemd unit must pass in with ``LoadCredential=NAME:credentials_dir/NAME``.
    """
    found: list[tuple[str, str]] = []

    def walk(section: Section, prefix: str) -> None:
        for field_name in type(section).model_fields:
            value = getattr(section, field_name)
            if isinstance(value, Section):
                walk(value, f"{prefix}{field_name}.")
            elif field_name.endswith("_file") and isinstance(value, str) and "/" not in value:
                found.append((prefix + field_name, value))

    walk(config, "")
    return found
