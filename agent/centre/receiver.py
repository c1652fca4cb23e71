"""The centre's reference receiver: verify, de-duplicate, store, acknowledge.

Every message is checked in this order, and the first failure is its reason:
``oversized`` → ``malformed`` → ``algorithm_not_allowed`` (only Ed25519; never
``none`` or HMAC) → ``unknown_device`` (key id not enrolled) →
``bad_signature`` → ``malformed`` claims → ``device_mismatch`` (claims name
another device or site than the enrolled key) → ``topic_mismatch`` →
``stale`` (send time outside −40 s/+20 s, as SIA DC-09) → ``replayed`` (a
sequence number already used for a different event).

A message already stored under the same (device, sequence, event id) is a
redelivery: it is acknowledged again but never stored or raised twice. The
acknowledgement is signed with the centre's key and sent only after the
message is on disk.

Two threads share the work, so signature checks overlap the waits on the
database: the screener verifies each message as it arrives; the worker takes
what is already verified (up to BATCH_MAX) and stores it with its registry and
chain rows in one transaction (one fsync; on PostgreSQL one statement per step
for the whole batch, not one per message), and only after that commit answers and releases
each at the broker, in arrival order. Verdicts are those of one message at a
time; if the shared commit fails, each message is stored on its own.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.centre.enrolment_desk import EnrolmentDesk
from agent.centre.enrolment_tokens import TokenBook
from agent.centre.forwarding import Forwarding
from agent.centre.keyring import Keyring
from agent.centre.metrics import receiver_metrics
from agent.centre.registry import DeviceEvent, Sighting
from agent.centre.store import ReceiverStore, open_store
from agent.config.centre import ReceiverConfig
from agent.config.secrets import secret_file
from agent.errors import SignatureInvalid
from agent.mqtt.link import Inbound, MqttLink
from agent.protocol.messages import ACKNOWLEDGED_KINDS, CHANNEL_OF_KIND, AckClaims, MessageClaims, TopicLayout
from agent.protocol.signing import ALGORITHM, MessageSigner, load_private_key, open_token, verify_claims
from agent.protocol.zero_touch import request_filter
from agent.runtime.guard import LoopGuard

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024
#: How often the fleet is looked at for devices gone silent (missing alarms are at most this late).
SUPERVISION_CHECK_S = 1.0
#: At most one NAK a second per device for messages the centre does not acknowledge (no amplifier).
NAK_INTERVAL_S = 1.0
#: At most this many queued messages are stored with one commit (one fsync) and then acknowledged.
BATCH_MAX = 64


@dataclass(frozen=True)
class Verdict:
    """What the receiver decided about one message.

    ``alive`` says whether the message proves that the device is alive now: only a fresh,
    first-seen message does. A redelivery, a replay, an old retained status or the last
    will never does.
    """

    outcome: Literal["accepted", "duplicate", "rejected", "ignored"]
    reason: str | None = None
    detail: str = ""
    claims: MessageClaims | None = None
    alive: bool = False
    skew_s: float = 0.0  # arrival minus the device's send time: how far off the device's clock looks


@dataclass(frozen=True)
class Pending:
    """A message that passed every check needing no database: it still has to be stored, or found stored."""

    claims: MessageClaims
    arrived_at: float
    alive: bool
    skew_s: float


@dataclass(frozen=True)
class Screened:
    """A message as the screener hands it to the worker: where it came from, when, and what the checks found."""

    inbound: Inbound
    arrived_at: float
    screened: Verdict | Pending


@dataclass(frozen=True)
class Recorded:
    """What writing a verdict's registry and chain rows found, to act on once they are committed."""

    back: DeviceEvent | None = None
    chain: tuple[int | None, bool] = (None, False)


class MessageChecker:
    """Verification and de-duplication, with no MQTT in sight (so it is easy to test)."""

    def __init__(
        self,
        keyring: Keyring,
        store: ReceiverStore,
        topics: TopicLayout,
        window_past_s: float = 40.0,
        window_future_s: float = 20.0,
        clock: Callable[[], float] = time.time,
    ):
        self.keyring = keyring
        self.store = store
        self.topics = topics
        self.window_past_s = window_past_s
        self.window_future_s = window_future_s
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self.guard = LoopGuard("checker")  # records unexpected errors once per kind; runs on the caller's thread

    def check(self, topic: str, payload: bytes, arrived_at: float | None = None) -> Verdict:
        """Judge one message and store it in its own transaction; never raises.

        ``arrived_at`` is when the broker handed it over. The receiver judges batches instead
        (``screen``, then ``settle`` inside one transaction, then ``count``); the verdicts are the same.
        """
        arrived_at = self.clock() if arrived_at is None else arrived_at
        screened = self.screen(topic, payload, arrived_at)
        if isinstance(screened, Pending):
            try:
                with self.store.transaction():
                    screened = self.settle_all([screened])[0]
            except (sqlite3.Error, OSError) as exc:
                screened = store_failed(screened, exc)
        return self.count(topic, screened)

    def screen(self, topic: str, payload: bytes, arrived_at: float) -> Verdict | Pending:
        """Every check that needs no database: a verdict, or a message still to be stored; never raises."""
        try:
            return self._screen(topic, payload, arrived_at)
        except SignatureInvalid as exc:
            return Verdict("rejected", exc.reason, str(exc))
        except Exception as exc:  # noqa: BLE001 - hostile input must never stop the receiver
            self.guard.failed("check", exc)
            return Verdict("rejected", "internal_error", f"{type(exc).__name__}: {exc}")

    def settle_all(self, screened: Sequence[Verdict | Pending]) -> list[Verdict]:
        """Store every screened message (or find it stored), in order: call inside ``store.transaction()``.

        Verdicts pass through unchanged. Errors propagate, so the caller can roll the whole transaction back.
        """
        pending = [(n, item) for n, item in enumerate(screened) if isinstance(item, Pending)]
        stored = self.store.store_many([(item.claims.model_dump(mode="json"), item.arrived_at) for _, item in pending])
        verdicts = list(screened)
        for (n, item), (event_id, inserted) in zip(pending, stored, strict=True):
            verdicts[n] = judge_stored(item, event_id, inserted)
        return verdicts  # type: ignore[return-value] - every Pending is replaced by its verdict

    def count(self, topic: str, verdict: Verdict) -> Verdict:
        """Count (and log a rejection of) a final verdict: once per message, after its commit."""
        self.counters[verdict.outcome if verdict.reason is None else verdict.reason] += 1
        if verdict.outcome == "rejected":
            log.warning("rejected message on %.200s: %s (%.300s)", topic, verdict.reason, verdict.detail)
        return verdict

    def _screen(self, topic: str, payload: bytes, arrived_at: float) -> Verdict | Pending:
        claims = self._authenticate(topic, payload)
        skew = arrived_at - claims.sent
        if claims.kind == "status" and claims.body.get("state") == "offline":
            return Pending(claims, arrived_at, alive=False, skew_s=skew)  # the last will, of any age
        if -self.window_future_s <= skew <= self.window_past_s:
            return Pending(claims, arrived_at, alive=True, skew_s=skew)
        outside = f"sent {skew:+.1f} s before arrival, outside -{self.window_future_s:g}/+{self.window_past_s:g} s"
        if claims.kind == "status":  # a retained "online" from long ago: no news, no alarm
            return Verdict("ignored", "old_status", outside, claims, skew_s=skew)
        # Refused, but answered with a signed NAK carrying the centre's time: the device corrects its
        # clock and sends again at once, so a wrong clock delays an alert by one round trip, never more.
        return Verdict("rejected", "stale", outside, claims, skew_s=skew)

    def _authenticate(self, topic: str, payload: bytes) -> MessageClaims:
        """Size, algorithm, enrolled key, signature, strict claims, device and topic: or a reason why not."""
        if len(payload) > MAX_MESSAGE_BYTES:
            raise SignatureInvalid("oversized", f"{len(payload)} bytes, more than {MAX_MESSAGE_BYTES}")
        opened = open_token(payload)
        header = opened.header
        if header.get("alg") != ALGORITHM:
            raise SignatureInvalid(
                "algorithm_not_allowed", f"algorithm {header.get('alg')!r}; only Ed25519 is accepted"
            )
        device = self.keyring.lookup(str(header.get("kid")))
        if device is None:
            raise SignatureInvalid("unknown_device", f"key id {header.get('kid')!r} is not enrolled")
        claims = verify_claims(MessageClaims, opened, device.key)
        if claims.device != device.device_id or claims.site != device.site:
            raise SignatureInvalid(
                "device_mismatch",
                f"claims say {claims.site}/{claims.device} but key {device.kid} is enrolled for "
                f"{device.site}/{device.device_id}",
            )
        if self.topics.parse(topic) != (claims.site, claims.device, CHANNEL_OF_KIND[claims.kind]):
            raise SignatureInvalid(
                "topic_mismatch", f"{claims.kind} from {claims.site}/{claims.device} on topic {topic:.200}"
            )
        return claims


def judge_stored(pending: Pending, event_id: str | None, inserted: bool) -> Verdict:
    """A first copy is accepted; a second copy of the same event a duplicate; another event on its sequence a replay.

    ``event_id`` is what the store read back under the message's (device, sequence) after writing:
    the verdict is "accepted" or "duplicate" only if that is this very event, for an acknowledgement
    promises exactly that (once the transaction is committed).
    """
    claims, skew = pending.claims, pending.skew_s
    if event_id is None:
        detail = f"{claims.device} seq {claims.seq} is not in the store after insert"
        return Verdict("rejected", "store_failed", detail, claims, skew_s=skew)
    if event_id != str(claims.event_id):
        detail = f"sequence {claims.seq} of {claims.device} was already used by event {event_id}"
        return Verdict("rejected", "replayed", detail)
    if inserted:
        return Verdict("accepted", claims=claims, alive=pending.alive, skew_s=skew)
    return Verdict("duplicate", claims=claims, skew_s=skew)


def store_failed(pending: Pending, exc: BaseException) -> Verdict:
    """The verdict on a message whose transaction was rolled back: no ack, but a NAK (sent again soon)."""
    return Verdict("rejected", "store_failed", f"could not store: {exc}", pending.claims, skew_s=pending.skew_s)


def describe(body: dict) -> str:
    """One short line for the log: what happened and where, without boxes or other detail."""
    if body.get("source") == "camera":
        return (
            f"{body.get('rule')} ({body.get('rule_type')}) in {body.get('zone') or 'view'}, count {body.get('count')}"
        )
    if "button" in body:
        return f"{body.get('alert_kind')} from button {body.get('button')!r} at {body.get('location') or '-'}"
    return ", ".join(f"{k}={v}" for k, v in sorted(body.items()))


class Receiver:
    """Subscribes (shared), checks every message, and acknowledges what it stored."""

    def __init__(
        self,
        config: ReceiverConfig,
        *,
        on_verdict: Callable[[Verdict], None] | None = None,
        on_device_event: Callable[[DeviceEvent], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config
        settings = config.receiver
        self.topics = TopicLayout(config.mqtt.topic_prefix)
        key_path = secret_file(settings.signing_key_file, config.secret_dirs, "receiver.signing_key_file")
        self.signer = MessageSigner(load_private_key(key_path))
        self.keyring = Keyring(config.keyring_path)
        self.store = open_store(config)  # SQLite or PostgreSQL, as [receiver] database says
        self.clock = clock  # the centre's clock: the time window and the ack's stored_at
        self.checker = MessageChecker(
            self.keyring, self.store, self.topics, settings.window_past_s, settings.window_future_s, clock
        )
        self.on_verdict = on_verdict
        self.on_device_event = on_device_event
        # Zero-touch enrolment: one-time tokens from 'centre token create' (see enrolment_desk).
        self.enrolment = EnrolmentDesk(
            TokenBook(self.store), self.keyring, config.ca_path, self.signer, self.topics.prefix, clock
        )
        self.enrolment.counters = self.checker.counters
        self.registry = self.store.registry(settings.supervision_s)
        self.metrics = receiver_metrics(settings.metrics_address, self.registry, self.keyring)
        self.enrolment.on_decision = self.metrics.enrolment
        self.forwarding = Forwarding(config, self.store, clock)  # [[forward.arc]]: on to alarm receiving centres
        self.forwarding.add_metrics(self.metrics)
        # One connection per broker: a device may be on any of them (it fails over in order).
        self.links = [self._connect_to(host, port) for host, port in config.mqtt.brokers]
        self.link = self.links[0]
        self._reply_via = self.link  # the connection the message being answered came on
        self._inbox: queue.Queue[tuple[Inbound, float] | None] = queue.Queue(maxsize=settings.max_inflight)
        # Checked messages on their way to the store: the next batch is verified while this one commits.
        self._screened: queue.Queue[Screened | None] = queue.Queue(maxsize=BATCH_MAX)
        self._last_nak: dict[str, float] = {}
        self._enrolled: tuple[int, list[tuple[str, str]]] = (-1, [])  # (keyring listing it is from, devices)
        self.guard = LoopGuard("receiver")
        self.screener = LoopGuard("screener")

    def _connect_to(self, host: str, port: int) -> MqttLink:
        config, settings = self.config, self.config.receiver
        link = MqttLink(
            config.mqtt.model_copy(update={"host": host, "port": port, "fallback": []}),
            client_id=config.mqtt.client_id or f"receiver-{settings.id}",
            secret_dirs=config.secret_dirs,
            session_expiry_s=settings.session_expiry_s,
            manual_ack=True,  # the broker keeps each message until it is stored here
            receive_maximum=settings.max_inflight,
            publish_window=0,  # one answer per message taken: Receive Maximum bounds them (no paho rescans)
        )
        prefix, group = self.topics.prefix, settings.share_group
        for channel in ("alert", "event", "telemetry"):
            link.subscribe(f"$share/{group}/{prefix}/+/+/{channel}")
        link.subscribe(f"{prefix}/+/+/status")
        link.subscribe(f"$share/{group}/{request_filter(prefix)}")
        # Bounded twice: the broker should hand over at most max_inflight unacknowledged messages (Receive
        # Maximum), and when it does not (mosquitto 2.0 once acknowledgements flow), a full inbox blocks
        # paho's network thread, so TCP pushes back on the broker instead of this queue growing.
        link.on_inbound = lambda inbound: self._inbox.put((inbound, self.clock()))
        return link

    def __enter__(self) -> Receiver:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def counters(self) -> Counter[str]:
        return self.checker.counters

    def start(self) -> None:
        self.metrics.start()
        self.forwarding.start()
        self.guard.start(self._work)
        self.screener.start(self._screen_inbound)
        for link in self.links:
            link.start()
        log.info("receiver %s started: %d device(s) enrolled", self.config.receiver.id, len(self.keyring))

    def close(self) -> None:
        self.metrics.close()
        for link in self.links:
            link.close(end_session=True)  # leave the shared group now, or the broker parks messages for us
        try:
            self._inbox.put(None, timeout=5)
        except queue.Full:
            log.error("receiver worker did not drain its inbox; stopping without it")
        self.screener.join(timeout=5)
        self.guard.join(timeout=5)
        self.forwarding.close()
        self.store.close()

    def problems(self) -> list[str]:
        """For the watchdog: empty while the worker runs and paho's network thread is alive."""
        found = [p for p in (self.guard.problem(), self.screener.problem()) if p] + self.forwarding.problems()
        if not all(link.network_thread_alive for link in self.links):
            found.append("MQTT network thread not running")
        return found

    def _work(self) -> None:
        next_check = time.monotonic() + SUPERVISION_CHECK_S
        next_prune = time.monotonic()
        stopping = False
        while not stopping:
            try:
                item = self._screened.get(timeout=max(0.0, next_check - time.monotonic()))
            except queue.Empty:
                item = ()
            self.guard.beat()
            if item is None:
                return
            if item:
                batch, stopping = self._take_queued([item])
                self._handle_screened(batch)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + SUPERVISION_CHECK_S
                with self.guard.step("supervision"):
                    self._supervise_fleet()
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + 3600
                with self.guard.step("retention"):
                    self._prune()

    def _screen_inbound(self) -> None:
        """Verify messages as they arrive, so signature checks overlap the worker's waits on the database."""
        while True:
            try:
                item = self._inbox.get(timeout=1.0)
            except queue.Empty:
                self.screener.beat()
                continue
            self.screener.beat()
            if item is None:
                self._hand_on(None)
                return
            inbound, at = item
            if self.enrolment.takes(inbound.topic):  # an enrolment request: answered here, never stored as a message
                with self.screener.step("enrolment"):
                    self.enrolment.handle(inbound.topic, inbound.payload, (inbound.link or self.link).publish)
                (inbound.link or self.link).ack(inbound)
                continue
            self._hand_on(Screened(inbound, at, self.checker.screen(inbound.topic, inbound.payload, at)))

    def _hand_on(self, item: Screened | None) -> None:
        """Queue a checked message for the worker; waiting (alive) while it is busy storing."""
        while True:
            try:
                self._screened.put(item, timeout=1.0)
                return
            except queue.Full:
                self.screener.beat()

    def _take_queued(self, batch: list[Screened]) -> tuple[list[Screened], bool]:
        """Whatever else is already waiting, up to BATCH_MAX in all; True if the stop sentinel came too."""
        while len(batch) < BATCH_MAX:
            try:
                item = self._screened.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _supervise_fleet(self) -> None:
        generation = self.keyring.generation()
        if self._enrolled[0] != generation:  # listed again since: enrolments or revocations
            self._enrolled = (generation, [(d.device_id, d.site) for d in self.keyring.devices()])
        with self.forwarding.atomic():  # a device-missing event and its forwarding rows commit together
            events = self.registry.check(self._enrolled[1], self.clock())
            self.forwarding.enqueue_device_events(events)
        for event in events:
            self._report(event)

    def _prune(self) -> None:
        days = self.config.receiver.retention_days
        removed = self.store.prune(self.clock() - days * 86400)
        if removed:
            log.info("retention: deleted %d record(s) older than %g days", removed, days)

    def _report(self, event: DeviceEvent) -> None:
        if event.event == "missing":
            log.warning("DEVICE MISSING %s/%s: %s", event.site, event.device, event.detail)
        else:
            log.info("device %s/%s is back: %s", event.site, event.device, event.detail)
        self.metrics.device_event(event)
        if self.on_device_event is not None:
            self.on_device_event(event)

    def _handle_batch(self, batch: list[tuple[Inbound, float]]) -> None:
        """Verify each message, then store and answer them as the worker does."""
        self._handle_screened(
            [Screened(inbound, at, self.checker.screen(inbound.topic, inbound.payload, at)) for inbound, at in batch]
        )

    def _handle_screened(self, checked: list[Screened]) -> None:
        """Store checked messages with one commit, then answer and release each, in order.

        The broker forgets a message (``link.ack``) only once it is stored or never will be. If the
        shared commit fails, each message gets its own, so one bad message cannot block the rest.
        """
        batch = [(item.inbound, item.arrived_at) for item in checked]
        screened = [item.screened for item in checked]
        try:
            with self.store.transaction():
                judged = self._settle_and_record(screened, [at for _, at in batch])
        except Exception as exc:  # noqa: BLE001 - whatever failed, each message gets its own chance
            if len(batch) > 1:
                log.warning("storing %d messages together failed (%s); storing them one by one", len(batch), exc)
            judged = [self._store_alone(item, at) for item, (_, at) in zip(screened, batch, strict=True)]
        for (inbound, _), (verdict, recorded) in zip(batch, judged, strict=True):
            with self.guard.step("message"):
                source = inbound.link or self.link
                try:
                    self._reply_via = source
                    self._respond(self.checker.count(inbound.topic, verdict), recorded)
                finally:
                    source.ack(inbound)  # only now may the broker forget it: it is stored, or it never will be

    def _store_alone(self, screened: Verdict | Pending, arrived_at: float) -> tuple[Verdict, Recorded]:
        """One message in its own transaction: a failure is this message's store_failed, nobody else's."""
        try:
            with self.store.transaction():
                return self._settle_and_record([screened], [arrived_at])[0]
        except (sqlite3.Error, OSError) as exc:
            if isinstance(screened, Pending):
                return store_failed(screened, exc), Recorded()
            return screened, Recorded()  # a verdict already, whose registry note could not be written
        except Exception as exc:  # noqa: BLE001 - a bug here must cost this message, not the loop
            self.guard.failed("message", exc)
            return Verdict("rejected", "internal_error", f"{type(exc).__name__}: {exc}"), Recorded()

    def _settle_and_record(
        self, screened: Sequence[Verdict | Pending], arrivals: list[float]
    ) -> list[tuple[Verdict, Recorded]]:
        """Store the batch, then its registry and chain rows: all inside the caller's transaction."""
        judged = self._record(self.checker.settle_all(screened), arrivals)
        self.forwarding.enqueue(judged)  # to the ARCs: queued in this transaction, so committed with the messages
        return judged

    def _record(self, verdicts: list[Verdict], arrivals: list[float]) -> list[tuple[Verdict, Recorded]]:
        """The registry's and the chain's rows for committed-to-be verdicts: written now, acted on after the commit."""
        sightings: list[tuple[int, Sighting]] = []
        links: list[tuple[int, tuple[str, int, int | None, float]]] = []
        for n, (verdict, at) in enumerate(zip(verdicts, arrivals, strict=True)):
            claims = verdict.claims
            if claims is None:
                continue
            sighting = sighting_of(verdict, at)
            if sighting is not None:
                sightings.append((n, sighting))
            if verdict.outcome == "accepted" and claims.kind in ACKNOWLEDGED_KINDS:
                # Each alert names the one before it: note when that one has not arrived, and when this fills a gap.
                links.append((n, (claims.device, claims.seq, claims.prev, at)))
        backs = self.registry.note([sighting for _, sighting in sightings])
        chains = self.store.follow_chains([link for _, link in links])
        recorded = {n: Recorded(back=backs.get(k)) for k, (n, _) in enumerate(sightings)}
        for (n, _), chain in zip(links, chains, strict=True):
            recorded[n] = Recorded(back=recorded.get(n, Recorded()).back, chain=chain)
        return [(verdict, recorded.get(n, Recorded())) for n, verdict in enumerate(verdicts)]

    def _respond(self, verdict: Verdict, recorded: Recorded) -> None:
        """Everything a committed verdict calls for: reports, acks or NAKs, log lines, the callback."""
        claims = verdict.claims
        self.metrics.judged(verdict, self.clock())
        if recorded.back is not None:
            self._report(recorded.back)
        if verdict.outcome == "accepted" and claims is not None and claims.kind == "status":
            log.info("device %s/%s is offline (its last will or a clean stop)", claims.site, claims.device)
        if claims is not None and claims.kind in ACKNOWLEDGED_KINDS and verdict.outcome in ("accepted", "duplicate"):
            self._acknowledge(claims, duplicate=verdict.outcome == "duplicate")
        if verdict.outcome == "accepted" and claims is not None and claims.kind in ACKNOWLEDGED_KINDS:
            self._log_chain(claims, *recorded.chain)
        elif verdict.reason == "stale" and claims is not None:
            self._refuse_stale(claims, verdict.skew_s)
        elif verdict.reason == "store_failed" and claims is not None and claims.kind in ACKNOWLEDGED_KINDS:
            # No ack (nothing is stored), but a NAK: the device sends it again shortly, not in ack_retry_s.
            self._answer(claims, AckClaims(**self._answer_fields(claims), kind="nak", reason="store_failed"))
        if verdict.outcome == "accepted" and claims is not None and claims.kind in ("alert", "tamper"):
            log.warning(
                "%s%s from %s/%s seq %d: %s%s",
                "TEST " if claims.test else "",
                claims.kind.upper(),
                claims.site,
                claims.device,
                claims.seq,
                describe(claims.body),
                clock_note(claims),
            )
        if self.on_verdict is not None:
            self.on_verdict(verdict)

    def _log_chain(self, claims: MessageClaims, missing: int | None, filled: bool) -> None:
        """Say when an alert's predecessor has not arrived, and when an outstanding one does."""
        if missing is not None:
            log.warning(
                "OUTSTANDING from %s/%s: seq %d was sent before seq %d and has not arrived",
                claims.site,
                claims.device,
                missing,
                claims.seq,
            )
        if filled:
            log.info("%s/%s seq %d arrived: no longer outstanding", claims.site, claims.device, claims.seq)

    def _acknowledge(self, claims: MessageClaims, duplicate: bool) -> None:
        self._answer(claims, AckClaims(**self._answer_fields(claims), duplicate=duplicate))

    def _refuse_stale(self, claims: MessageClaims, skew_s: float) -> None:
        """A signed, centre-timed NAK (as SIA DC-09 carries the receiver's time): the device corrects its clock.

        At most one a second per device for kinds the centre does not acknowledge, so a flood of stale
        telemetry cannot make the receiver a NAK amplifier.
        """
        now = self.clock()
        if claims.kind not in ACKNOWLEDGED_KINDS and now - self._last_nak.get(claims.device, 0.0) < NAK_INTERVAL_S:
            return
        self._last_nak[claims.device] = now
        log.warning("%s/%s clock looks off by %+.0f s; told it the centre's time", claims.site, claims.device, -skew_s)
        self._answer(claims, AckClaims(**self._answer_fields(claims), kind="nak", reason="stale"))

    def _answer_fields(self, claims: MessageClaims) -> dict:
        now = self.clock()
        fields = {"device": claims.device, "seq": claims.seq, "event_id": claims.event_id, "reply_to_sent": claims.sent}
        return {**fields, "receiver": self.config.receiver.id, "stored_at": now, "sent": now}

    def _answer(self, claims: MessageClaims, answer: AckClaims) -> None:
        topic = self.topics.topic(claims.site, claims.device, "ack")
        self._reply_via.publish(topic, self.signer.sign_model(answer).encode(), qos=1)
        self.metrics.answered(answer)


def sighting_of(verdict: Verdict, at: float) -> Sighting | None:
    """What a verdict tells the fleet registry: life (fresh, first seen), a last will, a clock reading; or nothing."""
    claims = verdict.claims
    assert claims is not None
    offline = verdict.outcome == "accepted" and claims.kind == "status" and not verdict.alive
    judged_by_time = verdict.outcome == "accepted" or verdict.reason == "stale"
    clock = device_clock_error(claims, verdict.skew_s) if judged_by_time and claims.kind != "status" else None
    if not (verdict.alive or offline or clock is not None):
        return None
    return Sighting(claims, at, alive=verdict.alive, offline=offline, clock_error_s=clock)


def device_clock_error(claims: MessageClaims, skew_s: float) -> float:
    """How far the device's own clock is off: what it reports having corrected, or what its send time shows."""
    return claims.clock_error_s if claims.clock_error_s else -skew_s


def clock_note(claims: MessageClaims) -> str:
    """ " (device clock off by N s)" for an alert signed with a corrected clock, else nothing."""
    return f" (device clock off by {claims.clock_error_s:+.0f} s, corrected)" if claims.clock_error_s else ""
