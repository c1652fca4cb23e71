"""A device's configuration: identity, broker, outbox, buttons, tamper switch, indicator, camera and rules."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, model_validator

from agent.config.base import Name, Section
from agent.config.fields import ConfigRelativePath
from agent.config.loading import load_model
from agent.config.mqtt import MqttSection
from agent.config.secrets import read_secret
from agent.config.vision import CameraSection, VisionConfig, VisionSettings
from agent.errors import ConfigError

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


class OutboxSection(Section):
    path: str = Field("outbox.sqlite", description="SQLite file, relative to state_dir.")
    capacity: int = Field(10_000, ge=100, le=1_000_000, description="Messages held; telemetry is dropped first.")
    ack_retry_s: float = Field(
        15.0,
        ge=1,
        le=3600,
        description="The longest wait for the centre's acknowledgement before sending again; the wait itself is "
        "learned from measured round trips (2 s at least) and doubles while nothing comes back.",
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
    help_display_s: float = Field(
        600.0, ge=1, le=3600, description="How long 'help is coming' is shown (a new press ends it sooner)."
    )


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
    def _hardware_consistent(self, info: ValidationInfo) -> AgentConfig:
        minimal = bool((info.context or {}).get("safe_mode"))  # safe mode: whatever buttons are left, no camera
        if self.device.kind != "camera-box" and not self.buttons and not minimal:
            raise ValueError(f"a {self.device.kind} needs at least one [[buttons]] entry")
        if self.device.kind == "camera-box" and self.camera is None and not minimal:
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


def _pin_key(pin: int | str) -> str:
    text = str(pin).upper()
    return f"GPIO{text}" if text.isdigit() else re.sub(r"^BCM", "GPIO", text)


def load_agent_config(path: Path | str) -> AgentConfig:
    """Read and validate a device configuration; raises ConfigError listing every problem."""
    config, text = load_model(path, AgentConfig)
    return config.model_copy(update={"source_sha256": hashlib.sha256(text.encode()).hexdigest()})
