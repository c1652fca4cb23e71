"""Starting with a configuration that does not validate: safe mode, never a dead call point.

``load_for_start`` reads the device's file, lays the centre's pushed settings
over it and validates the result. If that fails the agent still starts, in
*safe mode*, with (in this order):

1. the last-known-good configuration (``<state_dir>/fleet/last-good.json``,
   kept after every healthy start and every push that passed its health gate);
2. else a *minimal* configuration salvaged from the broken file. Minimal means
   what keeps the alert path alive and nothing else:

   - ``[device]`` (id, site, kind, state_dir) and ``[mqtt]`` must validate on
     their own: without them the device does not know who it is or where the
     centre is, and it cannot start (the errors are printed and it exits);
   - ``[identity]``, ``[outbox]``, ``[indicator]``, ``[control]``,
     ``[telemetry]`` and ``[tamper]`` are kept if they validate on their own,
     else their defaults (the tamper switch: left out);
   - every ``[[buttons]]`` entry that validates is kept as it is; one that does
     not but has a usable ``pin`` is kept as a plain press button on that pin
     (``assistance``), so every wired button still raises an alert; a pin used
     twice is kept for its first owner;
   - the camera, detector, zones and rules are left out: vision stays off.

The reasons (every validation error) are kept in :class:`StartingConfig` so the
agent reports "safe mode: …" in status, telemetry, a signed event and on the
LED; they are logged here once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from agent.config.device import (
    AgentConfig,
    ButtonSection,
    ControlSection,
    DeviceSection,
    IdentitySection,
    IndicatorSection,
    OutboxSection,
    TamperSection,
    TelemetrySection,
)
from agent.config.device import _pin_key as pin_key  # the validator's own notion of "the same pin"
from agent.config.errors import describe_validation_error
from agent.config.mqtt import MqttSection
from agent.device.config_files import ConfigFiles, PushedSettings, Trial
from agent.errors import ConfigError
from agent.protocol.config_doc import merge

log = logging.getLogger(__name__)

#: Where the state directory is when the file does not even say (the [device] state_dir default).
DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")
#: Sections kept when they validate alone; else their defaults (the tamper switch: none).
_OPTIONAL_SECTIONS: dict[str, type[BaseModel]] = {
    "identity": IdentitySection,
    "outbox": OutboxSection,
    "indicator": IndicatorSection,
    "control": ControlSection,
    "telemetry": TelemetrySection,
    "tamper": TamperSection,
}


@dataclass(frozen=True)
class StartingConfig:
    """The configuration an agent starts with, where it came from, and why it is in safe mode (if it is)."""

    config: AgentConfig
    path: Path
    source: str  # "file" (the file plus pushed settings), "last-good" or "minimal"
    version: int = 0  # of the pushed settings in force; 0: the file alone
    safe_mode: list[str] = field(default_factory=list)
    local: dict[str, Any] | None = None  # the file's own TOML, to lay new pushes over
    trial: Trial | None = None  # a push that needed a restart, on trial: the health gate decides

    @property
    def base_dir(self) -> Path:
        return self.path.resolve().parent


def load_for_start(path: Path | str, *, agent: bool = True) -> StartingConfig:
    """The configuration to start with; ConfigError only when not even a minimal one can be made.

    ``agent=False`` (``edge-agent status``, ``test-alert``: finding the running agent's socket) leaves a
    push on trial alone and logs nothing: only the agent itself may decide about it.
    """
    path = Path(path)
    say = log.critical if agent else log.debug
    text, local, problems = _read(path)
    state_dir = _state_dir(local, path)
    files = ConfigFiles(state_dir) if state_dir is not None else None
    pushed = files.pushed() if files is not None else PushedSettings()
    if local is not None and files is not None and agent:
        trial = _trial(files, pushed, local, path, text)
        if trial is not None:
            return trial
    if local is not None:
        try:
            config = validate(merge(local, pushed.overlay), path, text, pushed.version)
            return StartingConfig(config, path, "file", pushed.version, local=local)
        except ConfigError as exc:
            problems = exc.problems
    say("safe mode: %s does not validate:\n%s", path, "\n".join(problems))
    last_good = files.last_good() if files is not None else None
    if last_good is not None and _same_device(last_good.config, local):
        say("safe mode: running the last-known-good configuration (version %d)", last_good.version)
        return StartingConfig(last_good.config, path, "last-good", last_good.version, problems, local)
    if local is None:
        raise ConfigError(f"{path}: no usable configuration and no last-known-good one", problems)
    config, notes = minimal_config(local, path, problems)
    for note in notes:
        say("safe mode: %s", note)
    return StartingConfig(config, path, "minimal", 0, problems, local)


def _trial(
    files: ConfigFiles, pushed: PushedSettings, local: dict[str, Any], path: Path, text: str
) -> StartingConfig | None:
    """Start with a push on trial, once; a second start finds it tried (the agent died in its gate): dropped."""
    trial = files.trial()
    if trial is None:
        return None
    files.clear_trial()
    if trial.attempts == 0:
        try:
            config = validate(merge(local, trial.overlay), path, text, trial.version)
        except ConfigError as exc:
            reason = "does not validate at start: " + "; ".join(exc.problems)
        else:
            files.save_trial(Trial(trial.version, trial.selector, trial.gate_s, trial.overlay, attempts=1))
            log.warning("starting with pushed configuration v%d on trial: the health gate decides", trial.version)
            return StartingConfig(config, path, "file", trial.version, local=local, trial=trial)
    else:
        reason = "the agent stopped before its health gate ended"
    log.error("pushed configuration v%d rolled back: %s", trial.version, reason)
    report = {"outcome": "rolled_back", "reason": reason[:500], "version": trial.version, "selector": trial.selector}
    files.save_pushed(PushedSettings(pushed.version, max(pushed.handled, trial.version), pushed.overlay, report))
    return None


def validate(data: dict[str, Any], path: Path, text: str, version: int = 0) -> AgentConfig:
    """Validate merged data as a device configuration; ConfigError with one line per problem."""
    try:
        config = AgentConfig.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        where = str(path) if not version else f"{path} + pushed v{version}"
        problems = describe_validation_error(exc, text if not version else "", where, AgentConfig)
        raise ConfigError(f"{where}: {len(problems)} problem(s):\n" + "\n".join(problems), problems) from None
    source = text.encode() + (json.dumps(data, sort_keys=True, default=str).encode() if version else b"")
    return config.model_copy(update={"source_sha256": hashlib.sha256(source).hexdigest()})


def _read(path: Path) -> tuple[str, dict[str, Any] | None, list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return "", None, [f"{path}: cannot read config file: {exc}"]
    try:
        return text, tomllib.loads(text), []
    except tomllib.TOMLDecodeError as exc:
        return text, None, [f"{path}: not valid TOML: {exc}"]


def _context(path: Path, safe_mode: bool = False) -> dict[str, Any]:
    return {"base_dir": path.resolve().parent, "safe_mode": safe_mode}


def _state_dir(local: dict[str, Any] | None, path: Path) -> Path | None:
    """The state directory the file names, if its [device] section says (else the default one)."""
    device = (local or {}).get("device")
    if isinstance(device, dict) and "state_dir" in device:
        try:
            return DeviceSection.model_validate(
                {"id": "x", "site": "x", "kind": "call-point", "state_dir": device["state_dir"]},
                context=_context(path),
            ).state_dir
        except ValidationError:
            return None
    return DEFAULT_STATE_DIR


def _same_device(config: AgentConfig, local: dict[str, Any] | None) -> bool:
    """A last-known-good configuration is used only for the device the file (as far as it reads) is for."""
    device = (local or {}).get("device")
    if not isinstance(device, dict):
        return True
    return device.get("id", config.device.id) == config.device.id and device.get("site", config.device.site) == (
        config.device.site
    )


def minimal_config(local: dict[str, Any], path: Path, problems: list[str]) -> tuple[AgentConfig, list[str]]:
    """The alert path alone, salvaged from a file that does not validate (see the module docstring)."""
    notes: list[str] = []
    salvaged: dict[str, Any] = {}
    for name, model in (("device", DeviceSection), ("mqtt", MqttSection)):
        try:
            model.model_validate(local.get(name), context=_context(path))
        except ValidationError:
            raise ConfigError(
                f"{path}: [{name}] does not validate, so not even a minimal configuration can be made", problems
            ) from None
        salvaged[name] = local[name]
    for name, model in _OPTIONAL_SECTIONS.items():
        if name not in local:
            continue
        try:
            model.model_validate(local[name], context=_context(path))
            salvaged[name] = local[name]
        except ValidationError:
            notes.append(f"[{name}] does not validate: " + ("left out" if name == "tamper" else "defaults used"))
    salvaged["buttons"], button_notes = _salvage_buttons(local.get("buttons"), path)
    notes += button_notes
    _free_pins(salvaged, notes)
    tamper = "on" if "tamper" in salvaged else "off"
    notes.append(f"minimal configuration: {len(salvaged['buttons'])} button(s), tamper {tamper}, no camera")
    try:
        config = AgentConfig.model_validate(salvaged, context=_context(path, safe_mode=True))
    except ValidationError as exc:
        lines = describe_validation_error(exc, "", f"{path} (minimal)", AgentConfig)
        raise ConfigError(f"{path}: not even a minimal configuration validates", problems + lines) from None
    return config, notes


def _salvage_buttons(entries: Any, path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every button entry that validates; else a plain press button on its pin; else nothing (noted)."""
    if not isinstance(entries, list):
        return [], ([] if entries is None else ["[[buttons]] is not a list of tables: no buttons"])
    kept: list[dict[str, Any]] = []
    notes: list[str] = []
    for n, entry in enumerate(entries):
        entry = entry if isinstance(entry, dict) else {}
        name = entry.get("name")
        if not isinstance(name, str) or name in {b["name"] for b in kept}:
            name = f"button-{n + 1}"
        if _valid_button({**entry, "name": name}):
            kept.append({**entry, "name": name})
            continue
        for plain in ({"name": name, "pin": entry.get("pin")}, {"name": f"button-{n + 1}", "pin": entry.get("pin")}):
            if _valid_button(plain):
                kept.append(plain)
                notes.append(
                    f"buttons[{n}] does not validate: kept as a press button {plain['name']!r} on pin {plain['pin']!r}"
                )
                break
        else:
            notes.append(f"buttons[{n}] has no usable pin: left out")
    return kept, notes


def _valid_button(entry: dict[str, Any]) -> bool:
    try:
        ButtonSection.model_validate(entry)
    except ValidationError:
        return False
    return True


def _free_pins(salvaged: dict[str, Any], notes: list[str]) -> None:
    """A pin claimed twice stays with its first owner (buttons first, then tamper, then the indicator)."""
    used: set[str] = set()
    buttons = []
    for button in salvaged["buttons"]:
        key = pin_key(button["pin"])
        if key in used:
            notes.append(f"button {button['name']!r}: pin {button['pin']!r} is used twice; left out")
            continue
        used.add(key)
        buttons.append(button)
    salvaged["buttons"] = buttons
    tamper = salvaged.get("tamper")
    if tamper is not None:
        if pin_key(tamper["pin"]) in used:
            notes.append(f"tamper: pin {tamper['pin']!r} is used by a button; tamper left out")
            del salvaged["tamper"]
        else:
            used.add(pin_key(tamper["pin"]))
    indicator = dict(salvaged.get("indicator") or {})
    for what in ("led_pin", "buzzer_pin"):
        pin = indicator.get(what)
        if pin is not None and pin_key(pin) in used:
            notes.append(f"indicator.{what}: pin {pin!r} is in use; left out")
            indicator[what] = None
        elif pin is not None:
            used.add(pin_key(pin))
    if "indicator" in salvaged:
        salvaged["indicator"] = indicator
