"""The console service: the receiver's store, sessions, the change feed, an MQTT link for "help is coming".

It runs beside the receiver (any number of consoles on one store), never instead of it: it stores no
device messages and acknowledges nothing. It has its own MQTT connection only to send the signed
"responding" message when an operator takes charge of a call point's alert.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

from agent.centre.keyring import Keyring
from agent.centre.store import open_store
from agent.config.centre import ReceiverConfig
from agent.config.secrets import secret_file
from agent.console.auth import LoginLimiter, Sessions
from agent.console.live import ChangeFeed, PostgresWatcher, SqliteWatcher
from agent.console.state import AlertView, ConsoleState
from agent.mqtt.link import MqttLink
from agent.protocol.messages import TopicLayout
from agent.protocol.signing import MessageSigner, load_private_key

log = logging.getLogger(__name__)


class Console:
    """Everything one console process holds; ``app`` is its ASGI application, ``serve``/``start`` run it."""

    def __init__(self, config: ReceiverConfig, *, clock: Callable[[], float] = time.time, listen: str | None = None):
        from agent.console.web import create_app  # Starlette only where the console runs

        self.config = config
        self.clock = clock
        self.address = config.console.address if listen is None else _split(listen)
        self.store = open_store(config)
        self.state = ConsoleState(self.store)
        self.keyring = Keyring(config.keyring_path)
        watcher = (
            SqliteWatcher(config.database_path) if config.database_dsn is None else PostgresWatcher(config.database_dsn)
        )
        self.feed = ChangeFeed(watcher)
        limiter = LoginLimiter(config.console.login_attempts, config.console.lockout_s)
        self.sessions = Sessions(self.state, limiter, config.console.session_idle_s)
        self.link = MqttLink(
            config.mqtt,
            client_id=f"console-{config.receiver.id}-{secrets.token_hex(4)}",
            secret_dirs=config.secret_dirs,
            session_expiry_s=0,
        )
        self.responder = self._responder()
        self.app = create_app(self)
        self._server = None
        self._thread: threading.Thread | None = None

    def _responder(self):
        """The centre's "responding" sender, signing with the key the receiver signs acks with."""
        try:
            from agent.centre.responder import Responder
        except ImportError:  # an edge-agent without the responding message: take charge still works
            log.warning("console: this edge-agent cannot send 'help is coming' to devices")
            return None
        key = secret_file(self.config.receiver.signing_key_file, self.config.secret_dirs, "receiver.signing_key_file")
        return Responder(
            MessageSigner(load_private_key(key)),
            TopicLayout(self.config.mqtt.topic_prefix),
            lambda topic, payload: self.link.publish(topic, payload, qos=1),
            self.config.receiver.id,
        )

    def take_charge(self, alert: AlertView, operator: str) -> str:
        """Take charge (one operator wins), then tell the device help is coming where that may be shown.

        Returns what to tell the operator. The device is told only after the commit, so a device never
        shows "help is coming" for an alert nobody holds.
        """
        if not self.state.take(alert, operator, self.clock()):
            current = self.state.alert(alert.device, alert.seq)
            holder = current.taken_by if current and current.taken_by else "someone else"
            return f"already in the hands of {holder}" if current and current.state == "taken" else "already closed"
        return self._tell_device(alert, operator)

    def _tell_device(self, alert: AlertView, operator: str) -> str:
        if self.responder is None:
            return "taken; this centre cannot tell the device"
        stored = self.store.find(alert.device, alert.seq)
        try:
            sent = stored is not None and self.responder.help_is_coming(stored)
        except Exception as exc:  # noqa: BLE001 - the take stands; the operator must know the device was not told
            log.warning("console: could not tell %s that help is coming: %s", alert.device, exc)
            self.state.audit(self.clock(), operator, "device-not-told", f"{type(exc).__name__}", alert)
            return "taken; the device could NOT be told (no broker connection?)"
        if sent:
            self.state.audit(self.clock(), operator, "device-told", "help is coming", alert)
            return "taken; the device shows that help is coming"
        return "taken; nothing sent to the device (silent, duress or not a button alert)"

    def view_evidence(self, alert: AlertView, operator: str) -> tuple[bytes | None, str]:
        """(the alert's image, "") or (None, why not); either way audited: who asked for which image."""
        from agent.console.evidence import EvidenceViewer
        from agent.errors import AgentError

        ref = str((alert.body.get("evidence") or {}).get("ref", "-"))
        try:
            data = EvidenceViewer(self.config, self.keyring).image(alert)
        except AgentError as exc:  # EvidenceError, a missing key file: the operator is told, the attempt audited
            self.state.audit(self.clock(), operator, "evidence-failed", f"{ref}: {exc}", alert)
            return None, str(exc)
        self.state.audit(self.clock(), operator, "evidence-viewed", f"{ref} ({len(data)} bytes, sha256 checked)", alert)
        return data, ""

    # --- running

    def start(self) -> str:
        """Serve in a background thread (tests, the demo); returns the console's URL once it listens."""
        import uvicorn

        self.link.start()
        self._server = uvicorn.Server(self._uvicorn_config())
        self._thread = threading.Thread(target=self._server.run, name="console-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the console could not listen on {self.address[0]}:{self.address[1]}")
            time.sleep(0.02)
        return self.url

    def serve(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (``edge-agent centre console``)."""
        import uvicorn

        self.link.start()
        self._server = uvicorn.Server(self._uvicorn_config())
        self._server.run()

    def _uvicorn_config(self):
        import uvicorn

        host, port = self.address
        return uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_config=None,  # our logging; and no access log: it would hold addresses and names
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=1,
        )

    @property
    def url(self) -> str:
        host, port = self.address
        if self._server is not None and self._server.servers:
            host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def close(self) -> None:
        if self._server is not None:
            self.feed.end_streams()
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.feed.close()
        self.link.close()
        self.store.close()

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _split(listen: str) -> tuple[str, int]:
    from agent.config.centre import split_listen_address

    return split_listen_address(listen)
