"""What the receiver forwards to alarm receiving centres, and the one call it makes to do so.

Accepted alerts, tamper and test messages, and "device missing"/"device back" events, are mapped
to each configured ARC's account and Contact ID code (``docs/dc09.md``) and queued in the same
transaction that stores them (``enqueue`` / ``enqueue_device_events``), so the queue row commits
with the message or not at all. Test alerts always map to the test code, never to an alarm.
Telemetry, status and other device events are not forwarded. The DC-09 modules (and the ``crc``
package, in the ``centre`` extra) are imported only when an ARC is configured.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from agent.centre.forward_queue import Forward, ForwardQueue
from agent.config.forward import ArcAccount, ArcSection
from agent.config.secrets import read_secret
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.centre.registry import DeviceEvent
    from agent.config.centre import ReceiverConfig
    from agent.protocol.messages import MessageClaims

log = logging.getLogger(__name__)

FORWARDED_KINDS = frozenset({"alert", "tamper", "test"})
#: SIA DC-03 codes (new event, restore) for the Contact ID codes used, as DC-09 receivers map them.
SIA_CODES = {
    100: ("MA", "MH"),
    110: ("FA", "FH"),
    120: ("PA", "PH"),
    121: ("HA", "HH"),
    122: ("HA", "HH"),
    123: ("PA", "PH"),
    130: ("BA", "BH"),
    137: ("TA", "TR"),
    140: ("BA", "BH"),
    144: ("TA", "TR"),
    145: ("TA", "TR"),
    150: ("UA", "UH"),
    350: ("YC", "YK"),
    601: ("RX", "RX"),
    602: ("RP", "RP"),
}


def load_key(arc: ArcSection, dirs: tuple) -> bytes | None:
    """The ARC's AES key from its credentials file (hex: 128, 192 or 256 bits), or None when unset."""
    if arc.key_file is None:
        return None
    text = read_secret(arc.key_file, dirs, f"forward.arc {arc.name} key_file")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"forward.arc {arc.name} key_file: not hex digits") from None
    if len(key) not in (16, 24, 32):
        raise ConfigError(f"forward.arc {arc.name} key_file: {len(key) * 8} bits; AES needs 128, 192 or 256")
    return key


def event_code(claims: MessageClaims, arc: ArcSection) -> int:
    """The Contact ID code for an accepted message; a test is always the test code."""
    codes, body = arc.codes, claims.body
    if claims.test or claims.kind == "test":
        return codes.test
    if claims.kind == "tamper":
        return codes.tamper
    if body.get("source") == "camera":
        return codes.camera
    alert_kind = body.get("alert_kind")
    if isinstance(alert_kind, str) and alert_kind in codes.alert_kinds:
        return codes.alert_kinds[alert_kind]
    if alert_kind == "duress":
        return codes.duress
    if body.get("silent") is True:
        return codes.silent
    return codes.alert


def event_data(arc: ArcSection, entry: ArcAccount, code: int, restore: bool = False) -> str:
    """The event as DC-09 carries it after ``#acct|``, in the ARC's format."""
    from agent.centre.dc09 import contact_id, sia_dcs

    if arc.protocol == "ADM-CID":
        return contact_id(3 if restore else 1, code, entry.partition, entry.zone)
    new, restored = SIA_CODES.get(code, ("UA", "UH"))
    return sia_dcs(restored if restore else new, entry.partition, entry.zone)


def message_forwards(arc: ArcSection, claims: MessageClaims) -> list[Forward]:
    entry = arc.account_for(claims.site, claims.device)
    if entry is None:
        return []
    code = event_code(claims, arc)
    restore = claims.kind == "tamper" and claims.body.get("enclosure") == "closed"  # the tamper switch closed again
    what = f"{code} {'test ' if claims.test else ''}{claims.kind} from {claims.site}/{claims.device} seq {claims.seq}"
    source = f"msg:{claims.device}:{claims.seq}"
    return [Forward(arc.name, source, entry.account, arc.protocol, event_data(arc, entry, code, restore), what)]


def device_event_forwards(arc: ArcSection, event: DeviceEvent) -> list[Forward]:
    entry = arc.account_for(event.site, event.device)
    if entry is None or event.event not in ("missing", "back"):
        return []
    restore = event.event == "back"
    what = f"{arc.codes.missing} device {event.event}: {event.site}/{event.device}"
    source = f"dev:{event.device}:{event.event}:{secrets.token_hex(8)}"
    return [
        Forward(arc.name, source, entry.account, arc.protocol, event_data(arc, entry, arc.codes.missing, restore), what)
    ]


class Forwarding:
    """Every configured ARC's forwarder; nothing at all when none is configured."""

    def __init__(self, config: ReceiverConfig, store: Any, clock: Callable[[], float] = time.time):
        self.arcs = list(config.forward.arc)
        self.store = store
        self.queue = ForwardQueue(store)
        self.clock = clock
        holder = f"{config.receiver.id}-{os.getpid()}-{secrets.token_hex(3)}"
        self.forwarders = [] if not self.arcs else self._forwarders(config, holder)
        self.unmapped = 0  # events with no account at some ARC
        self._warned: set[tuple[str, str, str]] = set()

    def _forwarders(self, config: ReceiverConfig, holder: str) -> list:
        try:
            from agent.centre.forwarder import ArcForwarder
        except ImportError as exc:
            raise ConfigError(
                f"forward.arc is set but {exc.name} is not installed: pip install 'edge-agent[centre]'"
            ) from None
        return [
            ArcForwarder(
                arc,
                self.queue,
                load_key(arc, config.secret_dirs),
                holder,
                self.clock,
                config.receiver.retention_days * 86400,
            )
            for arc in self.arcs
        ]

    def start(self) -> None:
        for forwarder in self.forwarders:
            forwarder.start()
            log.info("forwarding to ARC %s (%s)", forwarder.name, forwarder.settings.primary)

    def close(self) -> None:
        for forwarder in self.forwarders:
            forwarder.close()

    def problems(self) -> list[str]:
        return [p for p in (f.guard.problem() for f in self.forwarders) if p]

    def enqueue(self, judged: Sequence[tuple[Any, Any]]) -> None:
        """Queue what committed-to-be verdicts (with their registry notes) forward: inside the store's transaction."""
        if not self.arcs:
            return
        forwards: list[Forward] = []
        for verdict, recorded in judged:
            claims = verdict.claims
            if verdict.outcome == "accepted" and claims is not None and claims.kind in FORWARDED_KINDS:
                forwards += self._each_arc(lambda arc, c=claims: message_forwards(arc, c), claims.site, claims.device)
            if recorded.back is not None:
                back = recorded.back
                forwards += self._each_arc(lambda arc, e=back: device_event_forwards(arc, e), back.site, back.device)
        self._queue(forwards)

    def enqueue_device_events(self, events: Sequence[DeviceEvent]) -> None:
        """Queue "device missing"/"back" events: inside the transaction that records them."""
        forwards: list[Forward] = []
        for event in events:
            forwards += self._each_arc(lambda arc, e=event: device_event_forwards(arc, e), event.site, event.device)
        self._queue(forwards)

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """The store's transaction when something is forwarded (so events and queue rows commit together)."""
        if not self.arcs:
            yield
            return
        with self.store.transaction():
            yield

    def _each_arc(self, forwards_at: Callable[[ArcSection], list[Forward]], site: str, device: str) -> list[Forward]:
        found = []
        for arc in self.arcs:
            mapped = forwards_at(arc)
            if not mapped:
                self.unmapped += 1
                if arc.account_for(site, device) is None and (arc.name, site, device) not in self._warned:
                    self._warned.add((arc.name, site, device))  # once per device, not at every event
                    log.warning(
                        "ARC %s: no account for %s/%s (nor a default_account): not forwarded", arc.name, site, device
                    )
            found += mapped
        return found

    def _queue(self, forwards: list[Forward]) -> None:
        if not forwards:
            return
        self.queue.enqueue(forwards, self.clock())
        for forwarder in self.forwarders:
            forwarder.wake()

    def add_metrics(self, metrics: Any) -> None:
        """Per-ARC gauges and counters in the receiver's metrics registry (when metrics are on)."""
        registry = getattr(metrics, "registry", None)
        if registry is not None and self.forwarders:
            registry.register(ForwardingCollector(self))


class ForwardingCollector:
    """Forwarding state per ARC, read from the database at scrape time, and the forwarders' counters."""

    def __init__(self, forwarding: Forwarding):
        self._forwarding = forwarding

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            states = self._forwarding.queue.status()
        except (sqlite3.Error, OSError) as exc:  # a scrape must not fail because the database is busy or closed
            log.warning("metrics: cannot read the forwarding state: %s", exc)
            return
        now = self._forwarding.clock()
        gauges = {
            "connected": GaugeMetricFamily(
                "edge_agent_arc_connected", "1 while a path to the ARC is open.", labels=["arc", "path"]
            ),
            "depth": GaugeMetricFamily(
                "edge_agent_arc_queue_depth", "Events not yet acknowledged by the ARC.", labels=["arc"]
            ),
            "oldest": GaugeMetricFamily(
                "edge_agent_arc_oldest_unacked_seconds",
                "Age of the oldest event the ARC has not acknowledged.",
                labels=["arc"],
            ),
            "ack": GaugeMetricFamily(
                "edge_agent_arc_last_ack_timestamp_seconds", "When the ARC last sent an ACK.", labels=["arc"]
            ),
            "nak": GaugeMetricFamily(
                "edge_agent_arc_last_nak_timestamp_seconds", "When the ARC last sent a NAK.", labels=["arc"]
            ),
            "fault": GaugeMetricFamily(
                "edge_agent_arc_fault", "1 while forwarding to the ARC is faulty.", labels=["arc"]
            ),
        }
        for state in states:
            gauges["connected"].add_metric([state.arc, state.path or ""], float(state.connected))
            gauges["depth"].add_metric([state.arc], state.depth)
            gauges["oldest"].add_metric(
                [state.arc], max(0.0, now - state.oldest_queued_at) if state.oldest_queued_at else 0.0
            )
            if state.last_ack_at is not None:
                gauges["ack"].add_metric([state.arc], state.last_ack_at)
            if state.last_nak_at is not None:
                gauges["nak"].add_metric([state.arc], state.last_nak_at)
            gauges["fault"].add_metric([state.arc], float(bool(state.fault)))
        yield from gauges.values()
        answers = CounterMetricFamily(
            "edge_agent_arc_answers", "Answers and failures by kind, this process.", labels=["arc", "kind"]
        )
        for forwarder in self._forwarding.forwarders:
            for kind, count in forwarder.counts.items():
                answers.add_metric([forwarder.name, kind], count)
        yield answers
