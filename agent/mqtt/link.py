"""The MQTT transport: the only module that imports paho.

``MqttLink`` owns one paho client (MQTT 5, TLS, auth, last will, capped
exponential reconnect) and exposes plain callbacks with plain types. paho's
callbacks run on its network thread, so the handlers given here must only
enqueue. paho return codes are turned into :class:`UplinkError` here and never
leave this module.

Durability is not paho's job: its in-flight queue lives in memory. Callers
commit to the outbox first and retire a message only from ``on_published``.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config.mqtt import MqttSection
from agent.config.secrets import read_secret, secret_file
from agent.errors import ConfigError, UplinkError

log = logging.getLogger(__name__)

#: QoS 1 messages a link has sent and the broker not yet PUBACKed, at most (paho queues the rest).
PUBLISH_WINDOW = 100

#: Failed attempts in a row on one broker (a lost connection counts as one) before the next is tried.
FAILOVER_AFTER = 2


@dataclass(frozen=True)
class Inbound:
    """A message taken from the broker; with manual acknowledgement, it stays the broker's until ``ack``."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float
    link: MqttLink | None = None  # the connection it came on: its acknowledgement and any answer go back there


@dataclass(frozen=True)
class Will:
    """The last will. A callable payload is made anew before every (re)connect, so a signed
    will carries a fresh sequence number and time each time it is armed."""

    topic: str
    payload: bytes | Callable[[], bytes]
    retain: bool = True

    def render(self) -> bytes:
        return self.payload() if callable(self.payload) else self.payload


class MqttLink:
    """One broker connection that keeps itself up and re-subscribes after every reconnect.

    Args:
        settings: the ``[mqtt]`` section.
        client_id: MQTT client id (unique per broker).
        secret_dirs: where relative secret file names are looked up after $CREDENTIALS_DIRECTORY.
        will: optional last will, published by the broker if this client vanishes.
        session_expiry_s: how long the broker keeps subscriptions and queued QoS 1
            messages (acks) for us while we are away; 0 for a clean session.
        manual_ack: the broker's copy of a QoS 1 message is released only by ``ack(inbound)``,
            not when it has been read: whoever stores it acknowledges it after the commit.
        receive_maximum: at most this many unacknowledged messages in our hands at once
            (MQTT 5 Receive Maximum); the broker holds the rest: backpressure, not growth.
    """

    def __init__(
        self,
        settings: MqttSection,
        client_id: str,
        secret_dirs: tuple[Path, ...],
        will: Will | None = None,
        session_expiry_s: int = 3600,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        publish_window: int = PUBLISH_WINDOW,
    ):
        """``publish_window``: QoS 1 messages sent and not yet PUBACKed, at most; 0 for no limit here (the
        receiver: it answers each message it takes once, so its Receive Maximum bounds its acks in flight)."""
        self.settings = settings
        self.client_id = client_id
        self.on_connected: Callable[[bool], None] = lambda session_present: None
        self.on_inbound: Callable[[Inbound], None] = lambda inbound: None  # with manual_ack
        self.on_disconnected: Callable[[str], None] = lambda reason: None
        self.on_message: Callable[[str, bytes], None] = lambda topic, payload: None
        self.on_published: Callable[[int, bool, str], None] = lambda mid, ok, reason: None
        self._subscriptions: dict[str, int] = {}
        self._pending_subacks: set[int] = set()
        self._early_subacks: set[int] = set()  # SUBACKs that beat subscribe() returning its mid
        self._sub_lock = threading.Lock()
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._manual_ack = manual_ack
        self._closing = False
        self._brokers = settings.brokers
        self._current = 0  # index in _brokers
        self._failures = 0  # failed attempts in a row on the current broker
        self._switch_lock = threading.Lock()
        self._switching = False
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self._last_refusal = ""
        self._client = paho.Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=manual_ack,
        )
        # Randomised per client, so a thousand devices back from one outage do not reconnect in one instant.
        jitter = random.uniform(0.5, 1.0)
        self._client.reconnect_delay_set(settings.reconnect_min_s * jitter, settings.reconnect_max_s * jitter)
        self._publish_window = publish_window
        # paho does not take the broker's Receive Maximum from CONNACK (MQTT 5 §4.9): _handle_connect warns
        # when the broker announces less than this; broker configs written here announce none.
        self._client.max_inflight_messages_set(publish_window)
        if settings.username is not None:
            password = None
            if settings.password_file is not None:
                password = read_secret(settings.password_file, secret_dirs, "mqtt.password_file")
            self._client.username_pw_set(settings.username, password)
        if settings.tls.enabled:
            self._configure_tls(secret_dirs)
        self._will = will
        self._arm_will()
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_publish
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_socket_open = self._handle_socket_open
        self._client.on_pre_connect = lambda client, userdata: self._arm_will()
        self._client.on_connect_fail = lambda client, userdata: self._failed_attempt()

    def _arm_will(self) -> None:
        if self._will is not None:
            self._client.will_set(self._will.topic, self._will.render(), qos=1, retain=self._will.retain)

    def _configure_tls(self, secret_dirs: tuple[Path, ...]) -> None:
        """A verifying TLS context; TLS files are found like secrets, and any that cannot be used is a ConfigError."""
        tls = self.settings.tls
        ca = None if tls.ca_file is None else secret_file(tls.ca_file, secret_dirs, "mqtt.tls.ca_file")
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"mqtt.tls.ca_file: {ca} is not a PEM CA bundle: {exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert_file and tls.key_file:
            cert = secret_file(tls.cert_file, secret_dirs, "mqtt.tls.cert_file")
            key = secret_file(tls.key_file, secret_dirs, "mqtt.tls.key_file")
            try:
                context.load_cert_chain(cert, key)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"mqtt.tls.cert_file/key_file: {cert} and {key} are not a PEM certificate and its key: {exc}"
                ) from None
        self._client.tls_set_context(context)

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else "disconnected"
        return f"<MqttLink {self.client_id} to {self.settings.host}:{self.settings.port} {state}>"

    def __enter__(self) -> MqttLink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def network_thread_alive(self) -> bool:
        """paho's loop thread is running (whether or not the broker is reachable)."""
        thread = getattr(self._client, "_thread", None)
        return thread is not None and thread.is_alive()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """True once connected and the broker has granted (SUBACK) every subscription asked for so far."""
        deadline = time.monotonic() + timeout
        if not self._connected.wait(timeout):
            return False
        return self._subscribed.wait(max(0.0, deadline - time.monotonic()))

    @property
    def broker(self) -> tuple[str, int]:
        """The broker this link uses now (the first of ``[mqtt]`` brokers unless it failed over)."""
        return self._brokers[self._current]

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting with capped exponential backoff."""
        self._connect_async(*self.broker)

    def _connect_async(self, host: str, port: int) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self._session_expiry_s
        if self._receive_maximum is not None:
            properties.ReceiveMaximum = self._receive_maximum
        try:
            self._client.connect_async(
                host,
                port,
                keepalive=self.settings.keepalive_s,
                clean_start=self._session_expiry_s == 0,
                properties=properties,
            )
        except (OSError, ValueError) as exc:
            raise UplinkError(f"cannot connect to {host}:{port}: {exc}") from None
        self._client.loop_start()

    # Several brokers: fail over in order, come back to the first.

    def _failed_attempt(self) -> None:
        """On paho's thread, after a failed or lost connection: after a few in a row, switch to the next broker."""
        self._failures += 1
        if self._failures < FAILOVER_AFTER or len(self._brokers) < 2 or self._closing or self._switching:
            return
        self._switching = True  # paho cannot be re-pointed from its own thread: a helper thread does it
        following = (self._current + 1) % len(self._brokers)
        threading.Thread(target=self._switch_to, args=(following,), name="mqtt-failover", daemon=True).start()

    def _switch_to(self, index: int) -> None:
        """Stop the connection (or its attempts) and connect to broker ``index`` instead (public paho calls only)."""
        with self._switch_lock:
            try:
                if self._closing:
                    return
                host, port = self._brokers[index]
                log.warning("switching to broker %s:%s (%d of %d)", host, port, index + 1, len(self._brokers))
                self._client.disconnect()
                self._client.loop_stop()
                self._current, self._failures = index, 0
                self._connect_async(host, port)
            finally:
                self._switching = False

    def _watch_first_broker(self) -> None:
        """While on a fallback broker: try the first one now and then, and go back to it when it answers."""
        primary = self._brokers[0]
        while not self._stop_watching.wait(self.settings.primary_check_s):
            if self._current == 0 or self._closing:
                return
            try:
                with socket.create_connection(primary, timeout=2.0):
                    pass
            except OSError:
                continue
            log.info("the first broker %s:%s answers again; going back to it", *primary)
            self._switch_to(0)
            return

    def probe(self, timeout: float = 10.0) -> str | None:
        """Connect once, now, and say why not: None when connected (then call ``close``), else the reason.

        For installers and the self-test: separates an unreachable broker, a TLS
        certificate that does not verify, and a refused login.
        """
        settings = self.settings
        try:
            self._client.connect(settings.host, settings.port, keepalive=settings.keepalive_s, clean_start=True)
        except ssl.SSLCertVerificationError as exc:
            return f"TLS: the broker's certificate does not verify ({exc.verify_message})"
        except ssl.SSLError as exc:
            return f"TLS handshake with {settings.host}:{settings.port} failed: {exc.reason or exc}"
        except (socket.gaierror, socket.herror) as exc:
            return f"cannot resolve {settings.host}: {exc.strerror}"
        except OSError as exc:
            return f"cannot reach {settings.host}:{settings.port}: {exc.strerror or exc}"
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.is_connected and not self._last_refusal:
            time.sleep(0.02)
        if self.is_connected:
            return None
        return (
            f"broker refused the connection: {self._last_refusal}"
            if self._last_refusal
            else f"no answer from the broker within {timeout:g} s"
        )

    def close(self, final: tuple[str, bytes] | None = None, end_session: bool = False) -> None:
        """Disconnect cleanly; ``final`` (topic, payload) is published retained first (e.g. 'offline').

        ``end_session`` asks the broker to forget our session now: a stopped receiver must not keep
        its share of a shared subscription, or the broker parks messages for it.
        """
        if final is not None and self.is_connected:
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        with self._switch_lock:
            self._closing = True
        self._stop_watching.set()
        properties = None
        if end_session:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        self._client.disconnect(properties=properties)
        self._client.loop_stop()
        self._connected.clear()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected and again after every reconnect."""
        self._subscriptions[topic_filter] = qos
        if self.is_connected:
            self._send_subscribe(topic_filter, qos)

    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        with self._sub_lock:
            self._subscribed.clear()
            result, mid = self._client.subscribe(topic_filter, options=SubscribeOptions(qos=qos))
            if result != paho.MQTT_ERR_SUCCESS:
                return  # not connected after all: sent again on the next connect
            if mid in self._early_subacks:
                self._early_subacks.discard(mid)
            else:
                self._pending_subacks.add(mid)
            if not self._pending_subacks:
                self._subscribed.set()

    def ack(self, inbound: Inbound) -> None:
        """Release a message the broker handed us (manual acknowledgement): it is ours now."""
        if self._manual_ack and inbound.qos > 0:
            self._client.ack(inbound.mid, inbound.qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Hand a message to paho; returns its mid. Not durable: the caller keeps its own copy."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise UplinkError(f"[code:{int(info.rc)}] publish to {topic} refused: {paho.error_string(info.rc)}")
        return info.mid

    # paho callbacks (network thread): translate and hand on, never block.

    def _handle_socket_open(self, client, userdata, sock) -> None:
        # Alerts and acks are small packets sent back to back: without this, Nagle's
        # algorithm meets delayed ACKs and an ack waits ~40 ms in the kernel.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if str(reason_code) != self._last_refusal:  # once per cause, not on every retry
                log.warning("broker %s:%s refused connection: %s", self.settings.host, self.settings.port, reason_code)
                self._last_refusal = str(reason_code)
            return
        self._last_refusal = ""
        self._failures = 0
        self._check_receive_maximum(properties)
        if self._current != 0 and (self._watcher is None or not self._watcher.is_alive()):
            self._watcher = threading.Thread(target=self._watch_first_broker, name="mqtt-first-broker", daemon=True)
            self._watcher.start()
        with self._sub_lock:
            self._pending_subacks.clear()
            self._early_subacks.clear()
            self._subscribed.set()
        for topic_filter, qos in list(self._subscriptions.items()):
            self._send_subscribe(topic_filter, qos)
        self._connected.set()
        session_present = bool(getattr(flags, "session_present", False))
        log.info(
            "connected to %s:%s as %s (%s session)",
            *self.broker,
            self.client_id,
            "resumed" if session_present else "new",
        )
        self.on_connected(session_present)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if was_connected and self._closing:
            log.info("disconnected from %s:%s", *self.broker)
            self.on_disconnected(str(reason_code))
        elif was_connected:
            log.warning("lost connection to %s:%s: %s", *self.broker, reason_code)
            self.on_disconnected(str(reason_code))
        if not self._closing:
            self._failed_attempt()

    def _check_receive_maximum(self, properties) -> None:
        """Warn if the broker takes fewer unacknowledged messages from a client than this link may send."""
        announced = getattr(properties, "ReceiveMaximum", None)
        if announced is None or 0 < self._publish_window <= announced:
            return
        window = self._publish_window or "no limit"
        log.warning(
            "broker %s:%s accepts at most %d unacknowledged messages from %s (its Receive Maximum) but this link "
            "sends up to %s; raise it on the broker (mosquitto: max_inflight_messages 0), or it may disconnect us",
            *self.broker,
            announced,
            self.client_id,
            window,
        )

    def _handle_message(self, client, userdata, message) -> None:
        if self._manual_ack:
            self.on_inbound(Inbound(message.topic, message.payload, message.mid, message.qos, time.time(), self))
        else:
            self.on_message(message.topic, message.payload)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.on_published(mid, not reason_code.is_failure, str(reason_code))

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for code in reason_codes:
            if code.is_failure:
                log.error("broker refused a subscription of %s: %s", self.client_id, code)
        with self._sub_lock:
            if mid in self._pending_subacks:
                self._pending_subacks.discard(mid)
            else:
                self._early_subacks.add(mid)
            if not self._pending_subacks:
                self._subscribed.set()
