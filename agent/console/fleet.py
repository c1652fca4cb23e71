"""The fleet as the console shows it: every enrolled device with its state, health and what needs a look."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from agent.centre.keyring import Keyring
from agent.centre.registry import DeviceState
from agent.centre.store import ReceiverStore
from agent.console.state import ConsoleState


@dataclass(frozen=True)
class FleetRow:
    site: str
    device: str
    kind: str
    state: str  # online / offline / missing / never seen
    last_seen_ago_s: float | None
    outbox_depth: Any
    clock_off_s: float | None
    last_test_alert: float | None
    tamper: str | None
    camera: str | None
    outstanding: list[int]
    enrolled: bool
    location: str = ""
    version: str | None = None  # the agent's software version, from its telemetry
    config_version: Any = None  # the centre's pushed configuration in force
    safe_mode: str | None = None  # why the device runs a fallback configuration, if it does

    @property
    def needs_look(self) -> bool:
        return (
            self.state == "missing"
            or bool(self.outstanding)
            or self.tamper == "open"
            or not self.enrolled
            or self.safe_mode is not None
        )


@dataclass(frozen=True)
class DeviceMarks:
    """What makes an alert from a device less trustworthy than it looks: a wrong clock, a gap before it."""

    clock_fault: dict[str, float]  # device -> clock error (s), beyond the threshold
    gaps: dict[str, list[int]]  # device -> sequence numbers named but never stored


def device_marks(store: ReceiverStore, clock_fault_s: float) -> DeviceMarks:
    sql = "SELECT device, clock_skew_s FROM devices WHERE clock_skew_s > ? OR clock_skew_s < ?"
    (rows,) = store.run_all([(sql, (clock_fault_s, -clock_fault_s))])
    gaps: dict[str, list[int]] = {}
    for device, seq, _ in store.outstanding():
        gaps.setdefault(device, []).append(seq)
    return DeviceMarks({device: skew for device, skew in rows}, gaps)


def fleet_rows(
    store: ReceiverStore, state: ConsoleState, keyring: Keyring, supervision_s: float, now: float | None = None
) -> list[FleetRow]:
    """Enrolled devices and any the registry has heard of, missing ones first."""
    now = time.time() if now is None else now
    enrolled = {d.device_id: d for d in keyring.devices()}
    states = {s.device: s for s in store.registry(supervision_s).states()}
    tests = state.last_test_alerts()
    gaps = device_marks(store, float("inf")).gaps
    rows = [
        _row(device, enrolled.get(device), states.get(device), tests.get(device), gaps.get(device, []), now)
        for device in set(enrolled) | set(states)
    ]
    order = {"missing": 0, "never seen": 1, "offline": 2, "online": 3}
    return sorted(rows, key=lambda r: (order.get(r.state, 4), r.site, r.device))


def _row(
    device: str, info, state: DeviceState | None, last_test: float | None, gaps: list[int], now: float
) -> FleetRow:
    telemetry = (state.last_telemetry if state else None) or {}
    if state is not None and state.missing:
        shown = "missing"
    elif state is None or state.last_seen is None:
        shown = "never seen"
    else:
        shown = state.status
    vision = telemetry.get("vision")
    return FleetRow(
        site=info.site if info else state.site,
        device=device,
        kind=info.kind if info else "?",
        state=shown,
        last_seen_ago_s=None if state is None or state.last_seen is None else max(0.0, now - state.last_seen),
        outbox_depth=telemetry.get("outbox_depth"),
        clock_off_s=state.clock_skew_s if state else None,
        last_test_alert=last_test if last_test is not None else _number(telemetry.get("last_test_alert")),
        tamper=telemetry.get("tamper") if isinstance(telemetry.get("tamper"), str) else None,
        camera=str(vision.get("state")) if isinstance(vision, dict) else None,
        outstanding=gaps,
        enrolled=info is not None,
        location=info.location if info else "",
        version=_text(telemetry.get("version")),
        config_version=_number(telemetry.get("config_version")),
        safe_mode=_text(telemetry.get("safe_mode")),
    )


def _text(value: Any) -> str | None:
    return value[:200] if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
