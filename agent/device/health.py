"""What a heartbeat says about the box itself: load, temperature, throttling, memory, disk.

Read from /proc and /sys (and the Pi firmware's throttling word where it is
exposed); a value the machine does not offer is None, never a guess.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")
# The Raspberry Pi firmware exposes `vcgencmd get_throttled` here on recent kernels.
THROTTLED = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temperature_limit",
    16: "under_voltage_occurred",
    17: "arm_frequency_capping_occurred",
    18: "throttling_occurred",
    19: "soft_temperature_limit_occurred",
}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_temperature_c() -> float | None:
    raw = _read(THERMAL_ZONE)
    return round(int(raw) / 1000, 1) if raw and raw.lstrip("-").isdigit() else None


def throttling() -> list[str] | None:
    raw = _read(THROTTLED)
    if raw is None:
        return None
    try:
        word = int(raw, 16) if raw.startswith("0x") else int(raw, 0)
    except ValueError:
        return None
    return [name for bit, name in THROTTLE_BITS.items() if word & (1 << bit)]


def memory() -> dict[str, int] | None:
    raw = _read(Path("/proc/meminfo"))
    if raw is None:
        return None
    fields = {line.split(":")[0]: int(line.split()[1]) for line in raw.splitlines() if line.split()[1:2]}
    return {"total_mb": fields.get("MemTotal", 0) // 1024, "available_mb": fields.get("MemAvailable", 0) // 1024}


def disk(path: Path) -> dict[str, float]:
    usage = shutil.disk_usage(path)
    return {"free_mb": usage.free // (1024 * 1024), "used_pct": round(100 * usage.used / usage.total, 1)}


def system_health(state_dir: Path) -> dict:
    load1, load5, _ = os.getloadavg()
    return {
        "cpu_load": [round(load1, 2), round(load5, 2)],
        "cpu_count": os.cpu_count(),
        "cpu_temperature_c": cpu_temperature_c(),
        "throttling": throttling(),
        "memory": memory(),
        "disk": disk(state_dir),
    }
