"""What a device keeps about its configuration between runs, in ``<state_dir>/fleet/``.

- ``last-good.json``: the whole configuration that last ran healthy (after its
  health gate, or after a healthy start), with its version. Safe mode starts
  from it when the configuration on disk does not validate.
- ``pushed.json``: the centre's pushed settings in force (every applied push
  merged, in version order) and the highest version handled: applied,
  rejected or rolled back, a version is never taken again; and an outcome
  still to be reported (decided before the agent could send it).
- ``trial.json``: a push that needs the agent restarted, while it is on trial:
  the next start runs it through the health gate once; a start that finds it
  tried already (the agent died during its gate) drops it: rolled back.

The state directory, not ``/etc``: the service may write only there
(``ProtectSystem=strict``). Every write is atomic (a crash leaves the old file
or the new one, never half of one).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config.device import AgentConfig
from agent.runtime.files import write_file_atomically

log = logging.getLogger(__name__)

FLEET_DIR = "fleet"
LAST_GOOD = "last-good.json"
PUSHED = "pushed.json"
TRIAL = "trial.json"


@dataclass
class PushedSettings:
    """The centre's settings in force on this device."""

    version: int = 0  # of the last applied push; 0: none
    handled: int = 0  # the highest version ever handled (applied, rejected or rolled back)
    overlay: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] | None = None  # an outcome not yet sent to the centre


@dataclass
class Trial:
    """A pushed configuration that takes effect at a restart, then must pass the health gate."""

    version: int
    selector: str
    gate_s: float
    overlay: dict[str, Any]  # the whole pushed overlay to run with (the one in force, with this push laid over)
    attempts: int = 0  # starts with it so far


@dataclass(frozen=True)
class LastGood:
    config: AgentConfig
    version: int
    saved_at: float


class ConfigFiles:
    """The fleet directory of one device."""

    def __init__(self, state_dir: Path):
        self.directory = Path(state_dir) / FLEET_DIR

    def pushed(self) -> PushedSettings:
        """What was pushed and applied; nothing when the file is missing or unreadable (said once, in the log)."""
        data = self._read(PUSHED)
        if data is None:
            return PushedSettings()
        try:
            report = data.get("report")
            return PushedSettings(
                int(data["version"]),
                int(data["handled"]),
                dict(data["overlay"]),
                report if isinstance(report, dict) else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.error("%s is not usable (%s); running without pushed settings", self.directory / PUSHED, exc)
            return PushedSettings()

    def save_pushed(self, settings: PushedSettings) -> None:
        body = {
            "version": settings.version,
            "handled": settings.handled,
            "overlay": settings.overlay,
            "report": settings.report,
        }
        write_file_atomically(self.directory / PUSHED, json.dumps(body, indent=1).encode(), 0o640)

    def trial(self) -> Trial | None:
        data = self._read(TRIAL)
        if data is None:
            return None
        try:
            return Trial(
                int(data["version"]),
                str(data["selector"]),
                float(data["gate_s"]),
                dict(data["overlay"]),
                int(data["attempts"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.error("%s is not usable (%s); dropped", self.directory / TRIAL, exc)
            self.clear_trial()
            return None

    def save_trial(self, trial: Trial) -> None:
        write_file_atomically(self.directory / TRIAL, json.dumps(trial.__dict__, indent=1).encode(), 0o640)

    def clear_trial(self) -> None:
        (self.directory / TRIAL).unlink(missing_ok=True)

    def last_good(self) -> LastGood | None:
        data = self._read(LAST_GOOD)
        if data is None:
            return None
        try:
            config = AgentConfig.model_validate(data["config"])
            return LastGood(config, int(data.get("version", 0)), float(data.get("saved_at", 0)))
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            log.error("%s is not a usable configuration: %s", self.directory / LAST_GOOD, exc)
            return None

    def save_last_good(self, config: AgentConfig, version: int) -> None:
        """Keep ``config`` as the one to fall back on; written only after it ran healthy."""
        body = {"version": version, "saved_at": time.time(), "config": config.model_dump(mode="json")}
        write_file_atomically(self.directory / LAST_GOOD, json.dumps(body, indent=1).encode(), 0o640)

    def _read(self, name: str) -> dict[str, Any] | None:
        path = self.directory / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("cannot read %s: %s", path, exc)
            return None
        return data if isinstance(data, dict) else None
