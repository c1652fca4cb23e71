"""The device agent: wires buttons, tamper switch, indicator, outbox, delivery and uplink together.

The alert path is: button activation → claims committed to the outbox (fsync)
→ LED shows *pending* → delivery signs and publishes (QoS 1) → PUBACK →
the centre's signed ack is verified → LED shows *acknowledged*. Nothing on this
path waits for the network: a press is accepted as soon as it is on disk.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.config.device import AgentConfig
from agent.config.secrets import secret_file
from agent.device.clock import CentreClock
from agent.device.commands import CommandRunner
from agent.device.config_update import ConfigUpdater
from agent.device.control import ControlServer
from agent.device.delivery import Delivery, DeliveryHooks
from agent.device.evidence_server import EvidenceServer, require_sealing_key
from agent.device.health import system_health
from agent.device.outbox import Outbox, OutboxEntry
from agent.device.response import HelpComing, names_responding
from agent.device.safe_mode import StartingConfig
from agent.device.software_update import SoftwareUpdater
from agent.device.statelock import StateDirLock
from agent.errors import ConfigError, OutboxError, UplinkError
from agent.mqtt.link import MqttLink, Will
from agent.protocol.messages import ACKNOWLEDGED_KINDS, TopicLayout, new_claims
from agent.protocol.sealing import CentreKeys, load_centre_keys
from agent.protocol.signing import MessageSigner, load_private_key
from agent.runtime.guard import LoopGuard
from agent.runtime.sdnotify import HealthWatchdog, SystemdNotifier
from hw.gpio import AlertButton, IndicatorState, StatusIndicator, TamperSwitch

log = logging.getLogger(__name__)

#: How often the LED is refreshed and the heartbeat timer looked at.
HOUSEKEEPING_TICK_S = 0.25
#: How often messages held in memory (storage failing) are tried again.
HELD_RETRY_S = 0.25
#: The outbox must answer a trivial query this fast, or the watchdog is withheld.
OUTBOX_ANSWER_S = 1.0


@dataclass
class HeldMessage:
    """A press or event accepted but not (yet) on disk.

    ``claims`` are fixed once a sequence number is recorded durably (``Outbox.next_sequence``):
    from then on the message goes out directly, and is later stored, with that same sequence
    number and event id, so the centre de-duplicates the two copies.
    """

    kind: str
    body: dict[str, Any]
    test: bool
    created: float
    button: str | None = None
    claims: dict[str, Any] | None = None
    sent_directly_at: float | None = None  # monotonic

    def describe(self) -> str:
        if self.button:
            return f"alert from button {self.button!r}"
        return "device event" if self.kind == "event" else f"{self.kind} event"


@dataclass
class StorageTrouble:
    """The current storage episode, for the LED, ``storage_fault`` in status/telemetry and the fault events."""

    error: str = ""
    holding_since: float | None = None  # wall clock of the first message held in this episode
    held: int = 0  # messages held in this episode
    sent_directly: int = 0  # copies of held messages handed to MQTT without the outbox (all time)
    reserve_in_use: bool = False  # as last reported to the centre


class Agent:
    """One device: call point, building button or camera box."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        pin_factory=None,
        on_published: Callable[[OutboxEntry, float], None] | None = None,
        on_acknowledged: Callable[[OutboxEntry, float], None] | None = None,
        starting: StartingConfig | None = None,
        restartable: bool = False,
    ):
        self.config = config
        #: Why the agent runs a fallback configuration (safe mode); empty when the file validated.
        self.safe_mode: list[str] = list(starting.safe_mode) if starting else []
        self.config_version = starting.version if starting else 0  # of the centre's pushed settings in force
        self.config_source = starting.source if starting else "file"
        #: ``edge-agent run`` starts the agent again when it stops with this set (a pushed change needs a restart).
        self.restartable = restartable
        self.restart_requested = False
        self.relaunch_requested = False  # ...by exec'ing the launcher: another version of the agent runs next
        self.device = config.device.id
        self.site = config.device.site
        self.started_at = time.monotonic()
        self._external_published = on_published
        self._external_acknowledged = on_acknowledged
        self._lock = threading.Lock()
        self._pending_visible: set[int] = set()
        self._ack_shown_until = 0.0
        self._last_test_alert: dict[str, Any] | None = None
        self._unstored: list[HeldMessage] = []  # accepted, not yet on disk: retried in order
        self._held_changed = threading.Event()
        self._stopping = threading.Event()
        self._closed = threading.Event()  # close() has finished: pins, state directory and outbox are free again
        self._closers: list[Callable[[], None]] = []
        self.clock = CentreClock()  # local time, corrected by the centre's signed answers
        self._storage = StorageTrouble()
        state_lock = StateDirLock(config.state_dir)  # first: a second agent must not touch the outbox or socket
        self._closers.append(state_lock.release)
        centre_keys = self._load_keys()
        self.topics = TopicLayout(config.mqtt.topic_prefix)
        self.outbox = Outbox(config.outbox_path, config.outbox.capacity, reserve_bytes=config.outbox.reserve_kb * 1024)
        self._closers.append(self.outbox.close)
        self.link = MqttLink(
            config.mqtt,
            client_id=config.mqtt.client_id or f"edge-{self.device}",
            secret_dirs=config.secret_dirs,
            will=Will(self.topics.topic(self.site, self.device, "status"), lambda: self._status_payload("offline")),
        )
        self.delivery = Delivery(
            self.outbox,
            self.link,
            self.signer,
            self.topics,
            centre_keys.signing,
            device=self.device,
            ack_retry_s=config.outbox.ack_retry_s,
            hooks=DeliveryHooks(published=self._on_published, acknowledged=self._on_acknowledged),
            clock=self.clock,
        )
        self.help_coming = HelpComing(
            self.device,
            centre_keys.signing,
            clock=self.clock,
            hold_s=config.indicator.help_display_s,
            on_change=self._refresh_indicator,
        )
        self._wire_link()
        self.evidence_server = self._serve_evidence(centre_keys)
        self._open_pins(pin_factory)
        for entry in self.outbox.entries():
            if entry.kind == "alert":
                silent = entry.claims["body"].get("silent") is not False
                self.help_coming.expect(entry.seq, entry.event_id, silent)
                if not silent:
                    self._pending_visible.add(entry.seq)
        self.vision = self._supervise_vision()
        self.config_updater = ConfigUpdater(self, centre_keys.signing, starting)
        self.commands = CommandRunner(self, centre_keys.signing, config.state_dir)
        self.software_updater = SoftwareUpdater(self, centre_keys.signing)
        self.control = ControlServer(
            config.control_socket, {"status": self._cmd_status, "test-alert": self._cmd_test_alert}
        )
        self._housekeeping = LoopGuard("housekeeping")
        self._held_retry = LoopGuard("held-retry")
        self._notifier = SystemdNotifier()
        self._watchdog = HealthWatchdog(self.problems, self._notifier, "alert path up")

    def _load_keys(self) -> CentreKeys:
        """The device's signing key and the centre's public keys; a ConfigError naming the file, before anything opens."""
        config = self.config
        private = secret_file(config.identity.private_key_file, config.secret_dirs, "identity.private_key_file")
        self.signer = MessageSigner(load_private_key(private))
        centre = secret_file(config.identity.centre_key_file, config.secret_dirs, "identity.centre_key_file")
        centre_keys = load_centre_keys(centre)
        require_sealing_key(config.rules, centre_keys)
        return centre_keys

    def _wire_link(self) -> None:
        self.link.on_connected = self._on_connected
        self.link.on_disconnected = self._on_disconnected
        self.link.on_published = self.delivery.handle_published
        self.link.on_message = self._on_message
        self.link.subscribe(self.topics.topic(self.site, self.device, "ack"))
        self.link.subscribe(self.topics.topic(self.site, self.device, "config"))
        self.link.subscribe(self.topics.topic(self.site, self.device, "command"))
        self.link.subscribe(self.topics.topic(self.site, self.device, "update"))

    def _serve_evidence(self, centre_keys: CentreKeys) -> EvidenceServer | None:
        """On a camera box: evidence leaves the box only when the centre asks for it."""
        if self.config.camera is None:
            return None
        server = EvidenceServer(
            self.link,
            self.topics,
            site=self.site,
            device=self.device,
            signer=self.signer,
            centre_keys=centre_keys,
            evidence_dir=self.config.evidence_dir,
            state_dir=self.config.state_dir,
        )
        self._closers.append(server.close)
        return server

    def _open_pins(self, pin_factory) -> None:
        """Indicator, buttons and tamper switch on their GPIO lines (gpiozero)."""
        config = self.config
        self.indicator = StatusIndicator(config.indicator.led_pin, config.indicator.buzzer_pin, pin_factory=pin_factory)
        self._closers.append(self.indicator.close)
        self.buttons: dict[str, AlertButton] = {}
        for settings in config.buttons:
            button = AlertButton(
                settings.pin,
                name=settings.name,
                activation=settings.activation,
                hold_s=settings.hold_s,
                presses=settings.presses,
                window_s=settings.window_s,
                bounce_s=settings.bounce_ms / 1000,
                pull_up=settings.pull_up,
                pin_factory=pin_factory,
            )
            button.when_activated = lambda b: self.raise_alert(b.name)
            self.buttons[settings.name] = button
            self._closers.append(button.close)
        self.tamper: TamperSwitch | None = None
        if config.tamper is not None:
            self.tamper = TamperSwitch(
                config.tamper.pin,
                pull_up=config.tamper.pull_up,
                closed_when_pressed=config.tamper.closed_when_pressed,
                pin_factory=pin_factory,
            )
            self.tamper.when_opened = lambda: self.raise_event("tamper", {"enclosure": "opened"})
            self.tamper.when_closed = lambda: self.raise_event("tamper", {"enclosure": "closed"})
            self._closers.append(self.tamper.close)

    def _supervise_vision(self):
        """On a camera box: the vision process's supervisor (no numpy here: the pipeline runs in its own process)."""
        if self.config.camera is None:
            return None
        from agent.vision.supervisor import VisionSupervisor

        supervisor = VisionSupervisor(self.config, on_message=self._on_vision_message, on_fault=self._on_fault)
        self._closers.append(supervisor.close)
        return supervisor

    def __repr__(self) -> str:
        return f"<Agent {self.site}/{self.device} connected={self.link.is_connected} outbox={self.outbox.depth()}>"

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        self._refresh_indicator()
        self.delivery.start()
        self.link.start()
        self.control.start()
        self._housekeeping.start(self._housekeep)
        self._held_retry.start(self._retry_held)
        if self.vision is not None:
            self.vision.start()
        self.config_updater.start()
        self.commands.start()
        self.software_updater.start()
        self._notifier.notify("READY=1", f"STATUS=alert path up; outbox depth {self.outbox.depth()}")
        self._watchdog.start()
        if self.tamper is not None and self.tamper.is_open:
            self.raise_event("tamper", {"enclosure": "opened", "at_start": True})
        if self.safe_mode:  # never silently: the centre gets it as a fault event, besides status, telemetry and LED
            self.raise_event("event", {"fault": "config", "state": "fault", "message": self._safe_mode_text()})
        log.info(
            "agent %s/%s started (%d button(s), outbox depth %d)",
            self.site,
            self.device,
            len(self.buttons),
            self.outbox.depth(),
        )

    def close(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._watchdog.stop()
        self._held_changed.set()
        for loop in (self._housekeeping, self._held_retry):
            loop.join(timeout=5)  # they write to the outbox: let them finish before the outbox closes
        self._notifier.notify("STOPPING=1")
        self.config_updater.close()
        self.commands.close()
        self.software_updater.close()
        self.control.close()
        final = (self.topics.topic(self.site, self.device, "status"), self._status_payload("offline"))
        self.link.close(final=final)
        self.delivery.stop()
        for closer in reversed(self._closers):
            closer()
        log.info("agent %s/%s stopped", self.site, self.device)
        self._closed.set()

    def wait(self) -> None:
        """Block until ``close()`` (from a signal handler, say, or a restart for a pushed change) has finished."""
        self._stopping.wait()
        self._closed.wait(timeout=60)  # a part that fails to close must not keep the process from ending

    # Events in.

    def raise_alert(self, button_name: str, *, test: bool = False) -> OutboxEntry | None:
        """Commit an alert for a button durably; returns once it is on disk.

        If the outbox cannot take it (disk full, storage failing), the press is not dropped: it is held
        in memory, the LED shows a fault, and the held-retry loop keeps trying to store it, in order.
        """
        settings = self.config.button(button_name)  # an unknown name is the caller's error, not a storage fault
        body = {
            "button": settings.name,
            "alert_kind": settings.alert_kind,
            "location": settings.location,
            "activation": settings.activation,
            "silent": settings.silent,
        }
        if not settings.silent:  # a silent press changes nothing the person at the button could see
            self.help_coming.new_press()
        return self._accept(HeldMessage("alert", body, test, self.clock.now(), button=settings.name))

    def _accept(self, message: HeldMessage) -> OutboxEntry | None:
        """Store a message, or hold it (in order, behind anything already held) when storage fails.

        The outbox has already drawn on its disk-full reserve before it gives up. A held message
        is sent directly by the held-retry loop (see ``_send_held``) and stored when it can be.
        Telemetry is never held: a heartbeat that cannot be stored is sent directly or dropped.
        """
        if message.kind == "telemetry":
            try:
                return self._commit(message.kind, message.body)
            except OutboxError as exc:
                self._send_unstored_heartbeat(message, exc)
                return None
        with self._lock:
            if self._unstored:  # earlier messages are still waiting: keep the order
                self._hold(message)
                return None
        try:
            return self._store(message)
        except OutboxError as exc:
            with self._lock:
                self._storage.error = str(exc)
                self._hold(message)
            log.critical(
                "%s could not be stored (%s); holding it, sending it directly, retrying", message.describe(), exc
            )
            self._refresh_indicator()
            return None

    def _hold(self, message: HeldMessage) -> None:
        """Called with ``self._lock`` held."""
        self._unstored.append(message)
        self._storage.held += 1
        if self._storage.holding_since is None:
            self._storage.holding_since = time.time()
        self._held_changed.set()  # the held-retry loop numbers it and sends it at once

    def _store(self, message: HeldMessage) -> OutboxEntry:
        if message.claims is not None:  # numbered (and maybe sent) while held: store that very message
            entry = self.outbox.store(message.kind, message.kind in ACKNOWLEDGED_KINDS, message.claims)
            self.delivery.wake()
        else:
            entry = self._commit(message.kind, message.body, test=message.test, created=message.created)
        if message.button is not None:
            self._press_stored(entry, message)
        else:
            log.info("%s event seq %d: %s", message.kind, entry.seq, message.body)
        return entry

    def _press_stored(self, entry: OutboxEntry, message: HeldMessage) -> None:
        self.help_coming.expect(entry.seq, entry.event_id, message.body["silent"])
        if not message.body["silent"]:
            with self._lock:
                self._pending_visible.add(entry.seq)
            self._refresh_indicator()
        prefix = "test " if message.test else ""
        log.info("%salert seq %d accepted from button %r", prefix, entry.seq, message.button)

    def raise_event(self, kind: str, body: dict[str, Any]) -> OutboxEntry | None:
        """Commit a tamper, fault or camera event; held and retried like a press if storage fails."""
        return self._accept(HeldMessage(kind, body, False, self.clock.now()))

    def _commit(
        self, kind: str, body: dict[str, Any], test: bool = False, created: float | None = None
    ) -> OutboxEntry | None:
        entry = self.outbox.add(
            kind,
            kind in ACKNOWLEDGED_KINDS,
            lambda seq: new_claims(
                device=self.device, site=self.site, seq=seq, kind=kind, body=body, test=test, created=created
            ),
        )
        self.delivery.wake()
        return entry

    def _on_vision_message(self, kind: str, body: dict[str, Any]) -> None:
        entry = self.raise_event(kind, body)  # never raises: a storage fault holds it, like a press
        if entry is None:
            return
        log.info(
            "camera %s %s/%s seq %d: %s",
            body.get("camera"),
            body.get("rule"),
            body.get("phase"),
            entry.seq,
            {k: body.get(k) for k in ("zone", "count", "track_ids")},
        )

    def _on_fault(self, component: str, text: str, recovered: bool) -> None:
        self.raise_event("event", {"fault": component, "state": "recovered" if recovered else "fault", "message": text})

    # Delivery and link callbacks.

    def _on_published(self, entry: OutboxEntry, at: float) -> None:
        if self._external_published:
            self._external_published(entry, at)

    def _on_acknowledged(self, entry: OutboxEntry, at: float) -> None:
        with self._lock:
            was_visible = entry.seq in self._pending_visible
            self._pending_visible.discard(entry.seq)
            if was_visible:
                self._ack_shown_until = time.monotonic() + self.config.indicator.ack_display_s
        self._refresh_indicator()
        log.info("%s seq %d acknowledged by the centre", entry.kind, entry.seq)
        if self._last_test_alert and self._last_test_alert["seq"] == entry.seq:
            self._last_test_alert["acknowledged"] = True
        self.config_updater.acknowledged(entry.seq)
        if self._external_acknowledged:
            self._external_acknowledged(entry, at)

    def _on_connected(self, session_present: bool) -> None:
        self.link.publish(
            self.topics.topic(self.site, self.device, "status"), self._status_payload("online"), retain=True
        )
        self.delivery.handle_connected(session_present)
        self._refresh_indicator()

    def _on_disconnected(self, reason: str) -> None:
        self.delivery.handle_disconnected(reason)
        self._refresh_indicator()

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.topic(self.site, self.device, "ack"):
            if names_responding(payload):
                self.help_coming.handle(payload)
            else:
                self.delivery.handle_ack(payload)
        elif topic == self.topics.topic(self.site, self.device, "config"):
            self.config_updater.submit(payload)
        elif topic == self.topics.topic(self.site, self.device, "command"):
            self.commands.submit(payload)
        elif topic == self.topics.topic(self.site, self.device, "update"):
            self.software_updater.submit(payload)
        elif self.evidence_server is not None and topic == self.evidence_server.request_topic:
            self.evidence_server.submit(payload)

    def _status_payload(self, state: str) -> bytes:
        claims = new_claims(
            device=self.device,
            site=self.site,
            seq=self.outbox.next_sequence(),
            kind="status",
            body={
                "state": state,
                "version": __version__,
                **({"safe_mode": self._safe_mode_text()} if self.safe_mode else {}),
            },
            created=self.clock.now(),
        )
        return self.signer.sign(claims).encode()

    # Indicator, telemetry, control.

    def indicator_state(self) -> IndicatorState:
        with self._lock:
            if self._unstored:
                return IndicatorState.FAULT  # a press we could not store yet: never pretend it is on its way
            if self.help_coming.showing:  # the centre has the alert and an operator took charge of it
                return IndicatorState.HELP_COMING
            if self._pending_visible:
                return IndicatorState.PENDING
            if time.monotonic() < self._ack_shown_until:
                return IndicatorState.ACKNOWLEDGED
        if not self.link.is_connected:
            return IndicatorState.FAULT
        return IndicatorState.SAFE_MODE if self.safe_mode else IndicatorState.IDLE

    def _refresh_indicator(self) -> None:
        self.indicator.show(self.indicator_state())

    def _housekeep(self) -> None:
        last_heartbeat = -float("inf")
        while not self._stopping.wait(HOUSEKEEPING_TICK_S):
            self._housekeeping.beat()
            with self._housekeeping.step("indicator"):
                self._refresh_indicator()
            if time.monotonic() >= last_heartbeat + self.config.telemetry.interval_s:  # a pushed interval: at once
                last_heartbeat = time.monotonic()
                with self._housekeeping.step("heartbeat"):
                    self.raise_event("telemetry", self.health())

    def _retry_held(self) -> None:
        """Its own loop, so that nothing else going wrong can keep a held press from its retries."""
        while not self._stopping.is_set():
            self._held_changed.wait(HELD_RETRY_S)
            self._held_changed.clear()
            self._held_retry.beat()
            with self._held_retry.step("send held messages"):
                self._send_held()
            with self._held_retry.step("store held messages"):
                self._store_held()
            with self._held_retry.step("disk reserve"):
                self.outbox.maintain_reserve()
                self._report_reserve()

    def _send_held(self) -> None:
        """Number held messages durably, in order, and hand them to MQTT without the outbox.

        The number comes from ``Outbox.next_sequence`` (the database, or the sequence floor file
        that needs no space), so no later message can reuse it, even after ``kill -9``. The centre
        stores and acknowledges the direct copy as usual; the stored copy sent later carries the
        same sequence number and event id, and the centre de-duplicates it. A copy is sent again
        after ``ack_retry_s`` while the message is still held (paho's queue dies with the process).
        """
        with self._lock:
            held = list(self._unstored)
        for message in held:
            if message.claims is not None:
                continue
            try:
                seq = self.outbox.next_sequence()
            except OutboxError as exc:
                log.error("no sequence number for a held %s: %s", message.describe(), exc)
                break  # numbers are given in order: a later message never gets an earlier one
            message.claims = new_claims(
                device=self.device,
                site=self.site,
                seq=seq,
                kind=message.kind,
                body=message.body,
                test=message.test,
                created=message.created,
            )
            if message.button is not None:
                self.help_coming.expect(seq, message.claims["event_id"], message.body["silent"])
        if not self.link.is_connected:
            return
        now = time.monotonic()
        for message in held:
            due = message.sent_directly_at is None or now - message.sent_directly_at >= self.config.outbox.ack_retry_s
            if message.claims is not None and due:
                try:
                    self._send_directly(message.kind, message.claims)
                except UplinkError as exc:
                    log.warning("held %s not sent directly: %s", message.describe(), exc)
                    return
                message.sent_directly_at = now
                self._storage.sent_directly += 1
                log.warning("held %s sent directly as seq %d", message.describe(), message.claims["seq"])

    def _send_directly(self, kind: str, claims: dict[str, Any]) -> None:
        signed = {**claims, "sent": self.clock.now()}
        if self.clock.error_s:
            signed["clock_error_s"] = self.clock.error_s
        token = self.signer.sign(signed).encode()
        self.link.publish(self.topics.for_kind(self.site, self.device, kind), token, qos=1)

    def _send_unstored_heartbeat(self, message: HeldMessage, why: OutboxError) -> None:
        """A heartbeat the outbox cannot take goes out directly, so the centre sees the device and its fault."""
        if not self.link.is_connected:
            log.debug("heartbeat dropped: %s", why)
            return
        try:
            seq = self.outbox.next_sequence()
            claims = new_claims(device=self.device, site=self.site, seq=seq, kind="telemetry", body=message.body)
            self._send_directly("telemetry", claims)
        except (OutboxError, UplinkError) as exc:
            log.warning("heartbeat dropped: %s (not stored: %s)", exc, why)

    def _store_held(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if not self._unstored:
                    break
                message = self._unstored[0]
            try:
                self._store(message)
            except OutboxError as exc:
                self._storage.error = str(exc)
                return  # still failing; try again on the next round
            with self._lock:
                self._unstored.pop(0)
            log.warning("held %s stored %.1f s after it happened", message.describe(), time.time() - message.created)
            self._refresh_indicator()
        self._report_recovery()

    def _report_recovery(self) -> None:
        """Storage works again: tell the centre, in a signed event, what was held and for how long."""
        with self._lock:
            since, held = self._storage.holding_since, self._storage.held
            if since is None or self._unstored:
                return
            self._storage.holding_since, self._storage.held, self._storage.error = None, 0, ""
        text = f"storage failed for {time.time() - since:.0f} s; {held} message(s) held in memory are now stored"
        log.warning("%s", text)
        self.raise_event("event", {"fault": "storage", "state": "recovered", "message": text, "since": since})

    def _report_reserve(self) -> None:
        """One event when alerts start using the disk-full reserve, one when it is set aside again."""
        in_use = self.outbox.reserve.in_use
        if in_use == self._storage.reserve_in_use:
            return
        self._storage.reserve_in_use = in_use
        left = self.outbox.reserve.held // 1024
        text = (
            f"disk full: messages are written into the space set aside for them ({left} KiB left)"
            if in_use
            else "disk space for alerts is set aside again"
        )
        self.raise_event("event", {"fault": "disk_full", "state": "fault" if in_use else "recovered", "message": text})

    def _storage_fault(self) -> str | None:
        """For status and telemetry: None while storage is healthy."""
        with self._lock:
            if self._unstored:
                return f"{len(self._unstored)} message(s) held in memory (sent directly): {self._storage.error}"
        reserve = self.outbox.reserve
        if reserve.in_use:
            return f"disk full: using the space set aside for alerts ({reserve.held // 1024} of {reserve.size // 1024} KiB left)"
        return None

    def problems(self) -> list[str]:
        """What is wrong with the alert path itself (not the network): empty when healthy."""
        found = [p for p in (loop.problem() for loop in self._loops()) if p]
        if not self.link.network_thread_alive:
            found.append("MQTT network thread not running")
        if not self.outbox.is_responsive(timeout_s=OUTBOX_ANSWER_S):
            found.append("outbox not responding")
        for name, button in self.buttons.items():
            try:
                _ = button.is_pressed  # reads the line: fails if the GPIO chip went away
            except Exception as exc:
                found.append(f"button {name!r} unreadable: {exc}")
        return found

    def _loops(self) -> list[LoopGuard]:
        loops = [
            self.delivery.guard,
            self._housekeeping,
            self._held_retry,
            self.config_updater.guard,
            self.commands.guard,
            self.software_updater.guard,
        ]
        return loops if self.vision is None else [*loops, self.vision.guard]

    def health(self) -> dict[str, Any]:
        try:
            depth, oldest = self.outbox.depth(), self.outbox.oldest_age_s()
        except OutboxError:  # storage failing: status must still answer, and say so
            depth, oldest = None, None
        return {
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "version": __version__,
            "config_sha256": self.config.source_sha256,
            "config_version": self.config_version,
            "config_source": self.config_source,
            "config_update": self.config_updater.report(),
            "software_update": self.software_updater.report(),
            "safe_mode": self._safe_mode_text(),
            "host": platform.node(),
            **system_health(self.config.state_dir),
            "connected": self.link.is_connected,
            "outbox_depth": depth,
            "oldest_unsent_s": None if oldest is None else round(oldest, 1),
            "dropped_telemetry": self.outbox.dropped_telemetry,
            "held_in_memory": len(self._unstored),
            "clock_error_s": self.clock.error_s,
            "storage_fault": self._storage_fault(),
            "storage_reserve": self.outbox.reserve.report(),
            "held_sent_directly": self._storage.sent_directly,
            "threads": {loop.name: loop.report() for loop in self._loops()},
            "bad_acks": dict(self.delivery.stats.bad_acks),
            "help_coming": self.help_coming.report(),
            "tamper": None if self.tamper is None else ("open" if self.tamper.is_open else "closed"),
            "last_test_alert": self._last_test_alert,
            "vision": None
            if self.vision is None
            else {"state": self.vision.state, "restarts": self.vision.restarts, **self.vision.stats},
        }

    def _cmd_status(self, request: dict[str, Any]) -> dict[str, Any]:
        stats = self.delivery.stats
        return {
            "device": self.device,
            "site": self.site,
            "kind": self.config.device.kind,
            "indicator": self.indicator_state().value,
            "pending_alerts": sorted(self._pending_visible),
            "buttons": {
                name: {"pressed": b.is_pressed, "activation": b.activation} for name, b in self.buttons.items()
            },
            "delivery": {
                "published": stats.published,
                "acknowledged": stats.acknowledged,
                "retransmitted": stats.retransmitted,
                "refused_by_broker": stats.refused_by_broker,
                "naks": stats.naks,
            },
            "evidence_requests": None if self.evidence_server is None else self.evidence_server.counters,
            **self.health(),
        }

    def _cmd_test_alert(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("button")
        if name is None:
            if not self.buttons:
                raise ConfigError("this device has no buttons to test")
            name = next(iter(self.buttons))
        entry = self.raise_alert(str(name), test=True)
        if entry is None:
            raise OutboxError(
                "the test alert could not be stored; it is held in memory, sent directly and retried (see the log)"
            )
        self._last_test_alert = {"button": name, "seq": entry.seq, "at": entry.created, "acknowledged": False}
        return {"seq": entry.seq, "event_id": entry.event_id, "button": name}

    # Configuration (safe mode, pushes from the centre: see config_update).

    def _safe_mode_text(self) -> str | None:
        if not self.safe_mode:
            return None
        return f"safe mode ({self.config_source}): " + "; ".join(self.safe_mode)[:2000]

    def reconfigure(self, config: AgentConfig) -> None:
        """Take a configuration whose differences apply live: intervals at once, the vision process restarted."""
        previous, self.config = self.config, config
        if config.vision_config() != previous.vision_config() or config.camera_login() != previous.camera_login():
            old = self.vision
            if old is not None:
                old.close()
                self._closers.remove(old.close)
            self.vision = self._supervise_vision()
            if self.vision is not None:
                self.vision.start()

    def request_restart(self, why: str) -> None:
        """Stop, so that ``edge-agent run`` starts the agent again with the configuration on disk."""
        log.warning("restarting the agent: %s", why)
        self.restart_requested = True
        self.close()

    def request_relaunch(self, why: str) -> None:
        """Stop, so that ``edge-agent run`` execs the launcher: the version ``current`` names runs next."""
        self.relaunch_requested = True
        self.request_restart(why)

    def config_applied(self, version: int) -> None:
        """A pushed configuration passed its health gate: it runs, and safe mode (if any) is over."""
        self.config_version, self.config_source, self.safe_mode = version, "file", []
        self._refresh_indicator()

    def alerts_unacknowledged(self) -> bool:
        """An alert (not a test) the centre has not acknowledged yet, stored or held: no configuration lands now."""
        with self._lock:
            if any(m.kind == "alert" and not m.test for m in self._unstored):
                return True
        return any(e.kind == "alert" and not e.claims.get("test") for e in self.outbox.entries())

    def gate_alert(self, version: int | str) -> OutboxEntry | None:
        """The health gate's test alert: from the first button, else a test event; None if it cannot be stored."""
        if self.buttons:
            return self.raise_alert(next(iter(self.buttons)), test=True)
        return self._accept(HeldMessage("test", {"health_gate": version}, True, self.clock.now()))
