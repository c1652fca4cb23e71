"""Moves outbox rows onto MQTT in order and retires them on PUBACK and on the centre's ack.

One thread owns all delivery state; paho's callbacks and button presses only
put events on its queue. Each copy is signed just before it is handed to MQTT
(fresh ``sent`` time), so a retransmission after a long outage still passes
the receiver's time window. Rows are handed over only while connected; after a
reconnect everything the broker has not confirmed is handed over again.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.device.ack_timer import AckTimer
from agent.device.clock import CentreClock
from agent.device.outbox import Outbox, OutboxEntry
from agent.errors import SignatureInvalid
from agent.protocol.messages import AckClaims, TopicLayout
from agent.protocol.signing import MessageSigner, verify_claims
from agent.runtime.backoff import Backoff
from agent.runtime.guard import LoopGuard

log = logging.getLogger(__name__)

#: Messages handed to paho and not yet confirmed by the broker: enough to fill a fast link, few enough
#: that a reconnect re-hands little.
PUBLISH_WINDOW = 50
#: How often unacknowledged messages are looked at for a resend (at most this late after their timeout).
RETRY_CHECK_S = 0.25
#: Messages the broker took but the centre has not acknowledged yet, at most: a device catching up
#: after an outage feeds the centre at the pace it acknowledges, instead of queueing thousands there.
ACK_WINDOW = 100
#: Pause after an unexpected error in the loop, so a failing disk or link is not spun on.
ERROR_PAUSE_S = 0.5
#: A broker that refuses a publish (ACL, quota) is asked again after 1 s, 2 s, … at most a minute apart.
REFUSAL_RETRY_FIRST_S = 1.0
REFUSAL_RETRY_MAX_S = 60.0
#: How many recently sent (sequence, event id) pairs are remembered to match the centre's answers.
RECENT_SENT = 1024
#: The MQTT 5 PUBACK reason 0x10: the broker took the message but nobody subscribes to it, so no
#: receiver will ever store or acknowledge this copy (the centre's broker restarted and the
#: receivers have not subscribed again yet, or no receiver runs).
NO_SUBSCRIBERS = "No matching subscribers"
#: First pause before sending again what nobody subscribed to; it doubles, up to ack_retry_s, while
#: nobody does.
UNHEARD_RETRY_S = 0.25


class Transport(Protocol):
    """What delivery needs from the MQTT link."""

    is_connected: bool

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int: ...


@dataclass
class DeliveryHooks:
    """Observers of delivery progress (indicator, telemetry, benchmarks). Called on the delivery thread."""

    published: Callable[[OutboxEntry, float], None] = lambda entry, puback_at: None
    acknowledged: Callable[[OutboxEntry, float], None] = lambda entry, ack_at: None


@dataclass
class DeliveryStats:
    published: int = 0
    acknowledged: int = 0
    refused_by_broker: int = 0
    retransmitted: int = 0
    unheard: int = 0  # PUBACKs saying nobody subscribes: sent again soon, not after ack_retry_s
    naks: int = 0
    unmatched_acks: int = 0  # genuine acks for nothing in the outbox: a redelivery's second ack, say
    bad_acks: dict[str, int] = field(default_factory=dict)


class Delivery:
    """The outbox's courier: one thread, fed by an event queue."""

    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        signer: MessageSigner,
        topics: TopicLayout,
        centre_key: Any,
        *,
        device: str,
        ack_retry_s: float,
        window: int = PUBLISH_WINDOW,
        hooks: DeliveryHooks | None = None,
        clock: CentreClock | None = None,
    ):
        self.outbox = outbox
        self.transport = transport
        self.signer = signer
        self.topics = topics
        self.centre_key = centre_key
        self.device = device
        self.ack_retry_s = ack_retry_s
        self.window = window
        self.hooks = hooks or DeliveryHooks()
        self.clock = clock or CentreClock()
        # (seq, event id, send time) of copies sent and not yet answered: only an answer to one of
        # these, naming its send time, may teach the clock, and only once (a replayed answer cannot).
        self._unanswered: OrderedDict[tuple[int, str, float], float] = OrderedDict()  # copy -> handed over at
        self.stats = DeliveryStats()
        self._events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._hold_until = 0.0
        self._refusal = Backoff(REFUSAL_RETRY_FIRST_S, REFUSAL_RETRY_MAX_S)
        self._unheard_retry = Backoff(UNHEARD_RETRY_S, max(UNHEARD_RETRY_S, ack_retry_s))
        self.ack_timer = AckTimer(ceiling_s=ack_retry_s)
        self._unheard_streak = False  # PUBACKs said "no matching subscribers" since the last normal one
        self._resend_unheard_at = 0.0  # monotonic time of a planned early resend (nobody subscribed, store failed)
        self._resend_reason = ""
        self._stopping = False
        self.guard = LoopGuard("delivery")

    # Called from any thread.

    def wake(self) -> None:
        self._events.put(("wake",))

    def handle_connected(self, session_present: bool = True) -> None:
        self._events.put(("connected", session_present))

    def handle_disconnected(self, reason: str) -> None:
        self._events.put(("disconnected",))

    def handle_published(self, mid: int, ok: bool, reason: str) -> None:
        self._events.put(("puback", mid, ok, reason, time.monotonic()))

    def handle_ack(self, payload: bytes) -> None:
        self._events.put(("ack", payload, time.monotonic()))

    def start(self) -> None:
        self.guard.start(self._run)

    def stop(self) -> None:
        self._stopping = True
        self._events.put(("stop",))
        self.guard.join(timeout=5)

    @property
    def is_alive(self) -> bool:
        return self.guard.is_alive

    # The delivery thread.

    def _run(self) -> None:
        next_retry_check = time.monotonic() + min(RETRY_CHECK_S, self.ack_retry_s)
        while not self._stopping:
            wake_at = min(next_retry_check, self._resend_unheard_at or next_retry_check)
            timeout = max(0.0, wake_at - time.monotonic())
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                event = ("tick",)
            self.guard.beat()
            failed_before = sum(self.guard.errors.values())
            with self.guard.step(event[0]):
                self._handle(event)
            with self.guard.step("retry check"):
                if self._resend_unheard_at and time.monotonic() >= self._resend_unheard_at:
                    self._resend_unheard_at = 0.0
                    self._resend_unacknowledged(self._resend_reason)
                if time.monotonic() >= next_retry_check:
                    next_retry_check = time.monotonic() + min(RETRY_CHECK_S, self.ack_retry_s)
                    self._requeue_unacknowledged()
            with self.guard.step("publish"):
                self._fill_window()
            if sum(self.guard.errors.values()) != failed_before and not self._stopping:
                time.sleep(ERROR_PAUSE_S)

    def _requeue_unacknowledged(self) -> None:
        timeout = self.ack_timer.timeout_s
        requeued = self.outbox.requeue_unacknowledged(timeout)
        if requeued:
            self.ack_timer.expired()
            self.stats.retransmitted += requeued
            log.warning("%d message(s) not acknowledged by the centre in %.1f s; sending again", requeued, timeout)

    def _handle(self, event: tuple) -> None:
        match event:
            case ("puback", mid, ok, reason, at):
                self._on_puback(mid, ok, reason, at)
            case ("ack", payload, at):
                self._on_ack(payload, at)
            case ("disconnected",):
                self._inflight.clear()
            case ("connected", session_present):
                self._hold_until = 0.0
                if not session_present:  # acks queued for us while away are gone with the old session
                    self._resend_unacknowledged("the broker lost our session")

    def _fill_window(self) -> None:
        if not self.transport.is_connected or time.monotonic() < self._hold_until:
            return
        room = min(self.window - len(self._inflight), ACK_WINDOW - self.outbox.awaiting_ack())
        if room <= 0:
            return
        for entry in self.outbox.unpublished(room, exclude=set(self._inflight.values())):
            claims = {**entry.claims, "sent": self.clock.now()}
            if self.clock.error_s:
                claims["clock_error_s"] = self.clock.error_s
            token = self.signer.sign(claims).encode()
            topic = self.topics.for_kind(claims["site"], claims["device"], entry.kind)
            mid = self.transport.publish(topic, token, qos=1)
            self._inflight[mid] = entry.seq
            self._remember_sent(entry.seq, entry.event_id, claims["sent"])

    def _on_puback(self, mid: int, ok: bool, reason: str, at: float) -> None:
        seq = self._inflight.pop(mid, None)
        if seq is None:
            return  # a copy paho resent from before a reconnect; its fresh twin is tracked instead
        if not ok:
            self.stats.refused_by_broker += 1
            delay = self._refusal.next()
            self._hold_until = time.monotonic() + delay
            log.error("broker refused message seq %d: %s; retrying in %.0f s", seq, reason, delay)
            return
        self._refusal.reset()
        entry = self.outbox.mark_published(seq)
        if entry is not None:
            self.stats.published += 1
            self.hooks.published(entry, at)
        if reason == NO_SUBSCRIBERS:
            self._unheard(seq)
        elif self._unheard_streak:
            self._unheard_streak = False
            self._unheard_retry.reset()
            log.info("the centre subscribes again")

    def _unheard(self, seq: int) -> None:
        """Nobody at the centre subscribed (its broker restarted and the receivers are not back yet, or none runs):
        whatever it has not acknowledged may be gone with it. Send it all again after a short, growing pause
        rather than after ``ack_retry_s``; the rest of the window's answers fall into the same pause."""
        self.stats.unheard += 1
        if not self._unheard_streak:
            log.warning("nobody at the centre subscribes to seq %d (%s); sending again shortly", seq, NO_SUBSCRIBERS)
        self._resend_soon("nobody at the centre subscribed to them")

    def _resend_soon(self, why: str) -> None:
        """Plan one resend of everything unacknowledged after a short pause that grows while the cause lasts."""
        self._unheard_streak = True
        if not self._resend_unheard_at:
            self._resend_reason = why
            self._resend_unheard_at = time.monotonic() + self._unheard_retry.next()

    def _remember_sent(self, seq: int, event_id: str, sent: float) -> None:
        self._unanswered[(seq, event_id, sent)] = time.monotonic()
        while len(self._unanswered) > RECENT_SENT:
            self._unanswered.popitem(last=False)

    def _resend_unacknowledged(self, why: str) -> None:
        resent = self.outbox.requeue_unacknowledged(0.0)
        if resent:
            self.stats.retransmitted += resent
            log.warning("%d message(s) not yet acknowledged: sending again now (%s)", resent, why)

    def _on_ack(self, payload: bytes, at: float) -> None:
        try:
            ack = verify_claims(AckClaims, payload, self.centre_key)
        except SignatureInvalid as exc:
            self._bad_ack(exc.reason, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - an ack is hostile input: nothing in it may stop delivery
            self._bad_ack("malformed", f"{type(exc).__name__}: {exc}")
            return
        if ack.device != self.device:
            self._bad_ack("wrong_device", f"acknowledgement is for device {ack.device!r}")
            return
        copy = (ack.seq, str(ack.event_id), ack.reply_to_sent)
        handed_at = self._unanswered.pop(copy, None)
        if handed_at is not None:  # the first answer to a copy we sent: fresh, so its time can be trusted
            self.clock.learn(ack.sent, time.time() - (time.monotonic() - at))
            self.ack_timer.sample(at - handed_at)
        if ack.kind == "nak":
            self.stats.naks += 1
            if ack.reason == "stale":  # signed again with the corrected clock, now
                self._resend_unacknowledged(f"the centre refused seq {ack.seq} as {ack.reason}")
            else:  # the centre could not store it: again shortly, not at once, not in a tight loop
                self._resend_soon(f"the centre could not store seq {ack.seq}")
            return
        entry = self.outbox.acknowledge(ack.seq, str(ack.event_id))
        if entry is None:
            self.stats.unmatched_acks += 1
        else:
            self.stats.acknowledged += 1
            self.hooks.acknowledged(entry, at)

    def _bad_ack(self, reason: str, message: str) -> None:
        self.stats.bad_acks[reason] = self.stats.bad_acks.get(reason, 0) + 1
        log.warning("ignored acknowledgement: %s", message)
