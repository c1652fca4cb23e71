"""Pushing a configuration to devices: one signed, retained copy on each selected device's ``config`` topic.

``edge-agent centre config push --device ID|--site SITE|--group KIND FILE``:
the document is checked (no secrets, nothing a push may not change: see
``agent.protocol.config_doc``), the devices are selected from the keyring, and
each gets its own copy naming it, signed with the centre's key, with one
version for the whole push and an expiry. Retained: a device that is offline
gets it when it connects. Versions only grow: the next is the larger of the
time in milliseconds and one more than the last this centre pushed to any of
the selected devices (``config-pushes.json`` in the receiver's state
directory, which is also the audit of what was pushed where).

What each device did with it comes back as a signed ``event`` whose body is
``{"config_update": {...}}``, stored by the receiver like any event; its
telemetry carries ``config_version`` and ``safe_mode`` (``receiver devices``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, UplinkError
from agent.protocol.config_doc import GROUPS, parse_document, sign_document
from agent.protocol.enrolment import EnrolledDevice
from agent.protocol.messages import TopicLayout
from agent.protocol.signing import MessageSigner
from agent.runtime.files import write_file_atomically

log = logging.getLogger(__name__)

PUSHES = "config-pushes.json"


@dataclass(frozen=True)
class Selection:
    selector: str  # "device:ID", "site:SITE" or "group:KIND"
    devices: list[EnrolledDevice]


def select(enrolled: list[EnrolledDevice], device: str | None, site: str | None, group: str | None) -> Selection:
    """The enrolled devices one of --device, --site or --group names; ConfigError if none is given, or none match."""
    given = [(scope, name) for scope, name in (("device", device), ("site", site), ("group", group)) if name]
    if len(given) != 1:
        raise ConfigError("give exactly one of --device ID, --site SITE or --group KIND")
    scope, name = given[0]
    if scope == "group" and name not in GROUPS:
        raise ConfigError(f"group {name!r}: a group is a device kind, one of {', '.join(GROUPS)}")
    field = {"device": "device_id", "site": "site", "group": "kind"}[scope]
    chosen = [d for d in enrolled if getattr(d, field) == name]
    if not chosen:
        raise ConfigError(f"no enrolled device matches --{scope} {name}")
    return Selection(f"{scope}:{name}", chosen)


class PushBook:
    """The versions this centre pushed to each device, and when: the next version is always larger."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / PUSHES

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path}: cannot read the record of pushes: {exc}") from None
        return data if isinstance(data, dict) else {}

    def next_version(self, devices: list[EnrolledDevice], now: float) -> int:
        book = self.read()
        last = max((int(book.get(d.device_id, {}).get("version", 0)) for d in devices), default=0)
        return max(int(now * 1000), last + 1)

    def record(self, devices: list[EnrolledDevice], version: int, selector: str, source: str, now: float) -> None:
        book = self.read()
        for device in devices:
            book[device.device_id] = {"version": version, "selector": selector, "file": source, "pushed_at": now}
        write_file_atomically(self.path, (json.dumps(book, indent=1, sort_keys=True) + "\n").encode(), 0o640)


def push(
    link,
    topics: TopicLayout,
    signer: MessageSigner,
    selection: Selection,
    document: dict[str, Any],
    *,
    version: int,
    expires_in_s: float,
    gate_s: float,
    timeout_s: float = 15.0,
) -> list[str]:
    """Publish one signed copy per device, retained, and wait for the broker to take each; returns the topics."""
    signed = [
        (
            topics.topic(device.site, device.device_id, "config"),
            sign_document(
                signer,
                document,
                device=device.device_id,
                site=device.site,
                selector=selection.selector,
                version=version,
                expires_in_s=expires_in_s,
                gate_s=gate_s,
            ),
        )
        for device in selection.devices
    ]
    return publish_retained(link, signed, timeout_s)


def publish_retained(link, signed: list[tuple[str, str]], timeout_s: float = 15.0) -> list[str]:
    """Publish each (topic, token), retained, and wait for the broker to take each (pushes and update manifests)."""
    published: dict[int, threading.Event] = {}
    refused: list[str] = []

    def on_published(mid: int, ok: bool, reason: str) -> None:
        if not ok:
            refused.append(reason)
        published.setdefault(mid, threading.Event()).set()

    link.on_published = on_published
    sent: list[tuple[str, int]] = []
    for topic, token in signed:
        mid = link.publish(topic, token.encode(), qos=1, retain=True)
        published.setdefault(mid, threading.Event())
        sent.append((topic, mid))
    deadline = time.monotonic() + timeout_s
    for topic, mid in sent:
        if not published[mid].wait(max(0.0, deadline - time.monotonic())):
            raise UplinkError(f"the broker did not confirm the publication on {topic} within {timeout_s:g} s")
    if refused:
        raise UplinkError(f"the broker refused {len(refused)} publication(s): {', '.join(sorted(set(refused)))}")
    return [topic for topic, _ in sent]


def read_document(path: Path) -> dict[str, Any]:
    """The file to push, as a checked document (ConfigError naming every refused setting)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_document(text, str(path))
