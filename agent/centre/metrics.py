"""The receiver's Prometheus metrics: what it decided, how long alerts took, how the fleet looks.

Counters and the press→store histogram are updated by the receiver as it works. The fleet
gauges (devices by state, each device's last telemetry) are read from the device registry
when Prometheus scrapes, so they are as fresh as the database and survive a restart.

Each receiver has its own ``CollectorRegistry`` (never the process-wide one), so several
receivers in one process, and tests, do not clash. prometheus-client (the ``centre`` extra)
is imported only when ``[receiver] metrics_listen`` is set: a receiver without metrics (the
demo, most tests) runs without it, and a call point never imports it (import-linter).
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Iterator
from typing import Any

from agent.centre.keyring import Keyring
from agent.centre.registry import DeviceEvent, DeviceRegistry, DeviceState
from agent.errors import ConfigError
from agent.protocol.messages import ACKNOWLEDGED_KINDS, AckClaims

log = logging.getLogger(__name__)

#: Press→store latency buckets (s): a live alert takes well under a second; one held in an outbox
#: while the link was down can take minutes or hours.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
DEVICE_STATES = ("online", "offline", "missing", "never_seen")


class MetricsOff:
    """What the receiver calls when metrics are off: nothing is counted or served."""

    address: tuple[str, int] | None = None

    def start(self) -> None:
        """Nothing to serve."""

    def close(self) -> None:
        """Nothing to stop."""

    def judged(self, verdict: Any, now: float) -> None:
        """Not counted."""

    def answered(self, answer: AckClaims) -> None:
        """Not counted."""

    def device_event(self, event: DeviceEvent) -> None:
        """Not counted."""

    def enrolment(self, outcome: str) -> None:
        """Not counted."""


def receiver_metrics(
    address: tuple[str, int] | None, registry: DeviceRegistry, keyring: Keyring
) -> MetricsOff | ReceiverMetrics:
    """Metrics served on ``address`` (host, port), or nothing at all when it is None."""
    return MetricsOff() if address is None else ReceiverMetrics(address, registry, keyring)


class ReceiverMetrics(MetricsOff):
    """One receiver's metrics and the HTTP endpoint Prometheus scrapes (``/metrics``)."""

    def __init__(self, address: tuple[str, int], registry: DeviceRegistry, keyring: Keyring):
        try:
            import prometheus_client
        except ImportError:
            raise ConfigError(
                "receiver.metrics_listen is set but prometheus-client is not installed: "
                "pip install 'edge-agent[centre]' (or unset metrics_listen)"
            ) from None
        self._prometheus = prometheus_client
        self._listen = address
        self._server: Any = None
        self._thread: Any = None
        self.address = None
        self.registry = prometheus_client.CollectorRegistry()
        counter, histogram = prometheus_client.Counter, prometheus_client.Histogram
        on = {"registry": self.registry}
        self.messages = counter(
            "edge_agent_receiver_messages",
            "Messages judged, by outcome (accepted/duplicate/rejected/ignored), reason (empty when accepted) and kind.",
            ["outcome", "reason", "kind"],
            **on,
        )
        self.press_to_store = histogram(
            "edge_agent_receiver_press_to_store_seconds",
            "From the event's creation on the device (claims 'created') to its storage at the centre.",
            ["kind"],
            buckets=LATENCY_BUCKETS_S,
            **on,
        )
        self.answers = counter(
            "edge_agent_receiver_answers",
            "Signed answers sent: kind ack/nak; reason stored/duplicate for acks, stale/store_failed for NAKs.",
            ["kind", "reason"],
            **on,
        )
        self.store_errors = counter(
            "edge_agent_receiver_store_errors", "Messages that could not be stored (refused with store_failed).", **on
        )
        self.device_events = counter(
            "edge_agent_receiver_device_events", "Devices reported missing, and back.", ["event"], **on
        )
        self.enrolments = counter(
            "edge_agent_receiver_enrolments",
            "Zero-touch enrolment requests decided: enrolled, pending (for an operator), or the reason refused.",
            ["outcome"],
            **on,
        )
        self.registry.register(FleetCollector(registry, keyring))

    def start(self) -> None:
        """Serve ``/metrics``; fails at once (with the address) when it cannot listen."""
        host, port = self._listen
        try:
            self._server, self._thread = self._prometheus.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self.address = self._server.server_address[:2]
        log.info("metrics on http://%s:%d/metrics", host, self.address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def judged(self, verdict: Any, now: float) -> None:
        """One verdict; ``now`` is the centre's time once the message is stored."""
        claims = verdict.claims
        kind = claims.kind if claims is not None else "unknown"  # unauthenticated: its kind is not known
        self.messages.labels(verdict.outcome, verdict.reason or "", kind).inc()
        if verdict.reason == "store_failed":
            self.store_errors.inc()
        if verdict.outcome == "accepted" and claims is not None and kind in ACKNOWLEDGED_KINDS:
            self.press_to_store.labels(kind).observe(max(0.0, now - claims.created))

    def answered(self, answer: AckClaims) -> None:
        reason = answer.reason or ("duplicate" if answer.duplicate else "stored")
        self.answers.labels(answer.kind, reason).inc()

    def device_event(self, event: DeviceEvent) -> None:
        self.device_events.labels(event.event).inc()

    def enrolment(self, outcome: str) -> None:
        self.enrolments.labels(outcome).inc()


class FleetCollector:
    """Devices by state and each device's last telemetry, read from the registry at scrape time."""

    def __init__(self, registry: DeviceRegistry, keyring: Keyring):
        self._registry = registry
        self._keyring = keyring

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            states = {s.device: s for s in self._registry.states()}
            enrolled = {d.device_id: d.site for d in self._keyring.devices()}
        except (sqlite3.Error, OSError) as exc:  # a scrape must not fail because the database is busy or closed
            log.warning("metrics: cannot read the device registry: %s", exc)
            return
        by_state = GaugeMetricFamily(
            "edge_agent_devices", "Devices by state (enrolled or heard from).", labels=["state"]
        )
        counts = dict.fromkeys(DEVICE_STATES, 0)
        for device in set(enrolled) | set(states):
            counts[device_state(states.get(device))] += 1
        for state, count in counts.items():
            by_state.add_metric([state], count)
        yield by_state
        yield from telemetry_gauges(list(states.values()), GaugeMetricFamily)


def device_state(state: DeviceState | None) -> str:
    """online / offline / missing / never_seen, as ``edge-agent receiver devices`` shows it."""
    if state is not None and state.missing:
        return "missing"
    if state is None or state.last_seen is None:
        return "never_seen"
    return "offline" if state.status == "offline" else "online"


#: Gauge name, help, and how to read it from a telemetry body (and the factor to seconds).
TELEMETRY_GAUGES = (
    ("edge_agent_device_outbox_depth", "Messages waiting in the device's outbox.", ("outbox_depth",), 1.0),
    (
        "edge_agent_device_oldest_unsent_seconds",
        "Age of the oldest message in the device's outbox.",
        ("oldest_unsent_s",),
        1.0,
    ),
    (
        "edge_agent_device_inference_seconds",
        "Mean detector inference time on a camera box.",
        ("vision", "inference_ms_avg"),
        0.001,
    ),
)


def telemetry_gauges(states: list[DeviceState], gauge_family: Any) -> Iterator[Any]:
    """Per-device gauges (labels device, site) from each device's last telemetry; absent figures are left out."""
    last_seen = gauge_family(
        "edge_agent_device_last_seen_timestamp_seconds",
        "When the device last sent a fresh verified message (Unix time).",
        labels=["device", "site"],
    )
    for state in states:
        if state.last_seen is not None:
            last_seen.add_metric([state.device, state.site], state.last_seen)
    yield last_seen
    for name, documentation, path, factor in TELEMETRY_GAUGES:
        family = gauge_family(name, documentation, labels=["device", "site"])
        for state in states:
            value = figure(state.last_telemetry, path)
            if value is not None:
                family.add_metric([state.device, state.site], value * factor)
        yield family


def figure(body: Any, path: tuple[str, ...]) -> float | None:
    """A finite number at ``path`` in a (signed, but still untrusted) telemetry body, else None."""
    for key in path:
        body = body.get(key) if isinstance(body, dict) else None
    if isinstance(body, bool) or not isinstance(body, int | float):
        return None
    try:
        value = float(body)
    except OverflowError:  # an integer too large for a float
        return None
    return value if math.isfinite(value) else None
