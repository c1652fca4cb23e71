"""Publishing a software update: one signed, retained manifest on each staged device's ``update`` topic.

``edge-agent centre update publish --version V --artefact FILE --url URL
(--stage PERCENT | --devices ID,ID)``: the artefact (a wheel or sdist of
edge-agent) is hashed here; the devices in the stage are chosen from the
keyring (a percentage by :func:`agent.protocol.update_manifest.in_percentage`,
the same test each device repeats) and each gets its own manifest naming it.
Publishing and waiting for the broker is ``config_push.push``'s job, reused.
``update-publishes.json`` in the receiver's state directory is the audit.

What each device did comes back as a signed ``event`` whose body is
``{"software_update": {...}}`` (installed, rolled_back, refused).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.protocol.enrolment import EnrolledDevice
from agent.protocol.update_manifest import MAX_ARTEFACT_BYTES, in_percentage
from agent.runtime.files import write_file_atomically

PUBLISHES = "update-publishes.json"


def staged(enrolled: list[EnrolledDevice], percent: float | None, devices: list[str] | None) -> list[EnrolledDevice]:
    """The enrolled devices in the stage; ConfigError if the stage is malformed or selects nobody."""
    if (percent is None) == (devices is None):
        raise ConfigError("give exactly one of --stage PERCENT or --devices ID,ID")
    if percent is not None:
        if not 0 < percent <= 100:
            raise ConfigError(f"--stage {percent:g}: a percentage above 0 and at most 100")
        chosen = [d for d in enrolled if in_percentage(d.device_id, percent)]
    else:
        unknown = sorted(set(devices or []) - {d.device_id for d in enrolled})
        if unknown:
            raise ConfigError(f"--devices: not enrolled: {', '.join(unknown)}")
        chosen = [d for d in enrolled if d.device_id in set(devices or [])]
    if not chosen:
        raise ConfigError("the stage selects no enrolled device")
    return chosen


def describe_artefact(path: Path) -> dict[str, Any]:
    """Size, sha256 and file name of the artefact (a wheel or an sdist, at most MAX_ARTEFACT_BYTES)."""
    path = Path(path)
    if not (path.name.endswith(".whl") or path.name.endswith(".tar.gz")):
        raise ConfigError(f"{path}: an artefact is a wheel (.whl) or an sdist (.tar.gz) of edge-agent")
    try:
        size = path.stat().st_size
        if size > MAX_ARTEFACT_BYTES:
            raise ConfigError(f"{path}: {size} bytes; at most {MAX_ARTEFACT_BYTES}")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return {"filename": path.name, "size": size, "sha256": digest}


def record(state_dir: Path, devices: list[EnrolledDevice], manifest: dict[str, Any], now: float) -> None:
    """Append this publication to the audit in the receiver's state directory."""
    path = Path(state_dir) / PUBLISHES
    try:
        book = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        book = []
    book = book if isinstance(book, list) else []
    book.append({**manifest, "devices": [d.device_id for d in devices], "published_at": now})
    write_file_atomically(path, (json.dumps(book, indent=1) + "\n").encode(), 0o640)


def manifests(
    devices: list[EnrolledDevice], artefact: dict[str, Any], *, version: str, url: str, **stage: Any
) -> list[tuple[EnrolledDevice, dict[str, Any]]]:
    """The manifest fields for each device (signing adds issued and expires)."""
    return [
        (device, {"device": device.device_id, "site": device.site, "version": version, "url": url, **artefact, **stage})
        for device in devices
    ]
