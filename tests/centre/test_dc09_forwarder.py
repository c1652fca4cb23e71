"""Store-and-forward to an alarm receiving centre, against pysiaalarm's DC-09 receiver on loopback.

pysiaalarm (the library behind Home Assistant's SIA integration) runs as the ARC in a thread of the
test, on a free loopback port, with and without AES. It parses, checks (CRC, account, timestamp
window, key) and ACKs or NAKs what the forwarder sends; the forwarder's rows live in a real
receiver store (SQLite here).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from agent.centre.dc09 import contact_id, sia_dcs
from agent.centre.forward_queue import Forward
from agent.centre.forwarding import Forwarding
from agent.centre.store import ReceiverStore
from agent.config.centre import ReceiverConfig, load_receiver_config
from tests.conftest import wait_until

pytest.importorskip("pysiaalarm", reason="pip install pysiaalarm (the test extra)")
from pysiaalarm import SIAAccount, SIAClient  # noqa: E402

#: pysiaalarm takes a key as text and uses its ASCII bytes; our key file holds those bytes in hex.
AES128 = "0123456789ABCDEF"
AES256 = "0123456789ABCDEF0123456789ABCDEF"


class SiaArc:
    """pysiaalarm's threaded TCP receiver as the ARC: keeps every event it accepted (and ACKed), in order."""

    def __init__(self, accounts: list[tuple[str, str | None]], port: int = 0):
        self.accounts = accounts
        self.port = port
        self.events: list = []
        self._lock = threading.Lock()
        self._client: SIAClient | None = None

    def start(self) -> SiaArc:
        accounts = [SIAAccount(account, key) for account, key in self.accounts]
        self._client = SIAClient("127.0.0.1", self.port, accounts, self._received)
        self.port = self._client.sia_server.server_address[1]
        self._client.start()
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.stop()
            self._client = None

    def _received(self, event) -> None:
        with self._lock:
            self.events.append(event)

    def got(self, message_type: str = "ADM-CID") -> list:
        with self._lock:
            return [e for e in self.events if e.message_type.value == message_type]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def arcs():
    started: list[SiaArc] = []

    def start(accounts, port: int = 0) -> SiaArc:
        arc = SiaArc(accounts, port).start()
        started.append(arc)
        return arc

    yield start
    for arc in started:
        arc.stop()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def receiver_config(tmp_path: Path, arc_toml: str, key_text: str | None = None) -> ReceiverConfig:
    credentials = tmp_path / "credentials"
    credentials.mkdir(exist_ok=True)
    if key_text is not None:
        (credentials / "arc.key").write_text(key_text.encode().hex() + "\n")
    path = tmp_path / "receiver.toml"
    path.write_text(
        '[receiver]\nstate_dir = "."\ncredentials_dir = "credentials"\n\n'
        '[mqtt]\nhost = "127.0.0.1"\nport = 1883\n[mqtt.tls]\nenabled = false\n\n' + arc_toml
    )
    return load_receiver_config(path)


def arc_toml(primary: str, *, backup: str | None = None, key: bool = False, **extra) -> str:
    settings = {
        "name": "arc-1",
        "primary": primary,
        "default_account": "1234",
        "ack_timeout_s": 1.0,
        "retry_first_s": 0.05,
        "retry_max_s": 0.5,
        "null_interval_s": 3600,
        **extra,
    }
    if backup:
        settings["backup"] = backup
    if key:
        settings["key_file"] = "arc.key"
    lines = [f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {v}" for k, v in settings.items()]
    return "[[forward.arc]]\n" + "\n".join(lines) + "\n"


def queue_events(forwarding: Forwarding, store: ReceiverStore, zones: list[tuple[str, int]]) -> None:
    """Rows as the receiver queues them (inside a store transaction): one Contact ID panic per (account, zone)."""
    with store.transaction():
        forwarding.queue.enqueue(
            [
                Forward(
                    "arc-1", f"test:{account}:{zone}", account, "ADM-CID", contact_id(1, 120, 1, zone), f"zone {zone}"
                )
                for account, zone in zones
            ],
            time.time(),
        )
    for forwarder in forwarding.forwarders:
        forwarder.wake()


@pytest.fixture
def store(tmp_path):
    with ReceiverStore(tmp_path / "receiver.sqlite") as opened:
        yield opened


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """Opens a store (each call: another connection) on one database of the parametrised backend."""
    opened = []
    dsn = []

    def reopen():
        if request.param == "sqlite":
            store = ReceiverStore(tmp_path / "receiver.sqlite")
        else:
            from agent.centre.store_postgres import PostgresStore
            from tests.centre.test_store_backends import fresh_database

            if not dsn:
                dsn.append(fresh_database(request.getfixturevalue("postgres")))
            store = PostgresStore(dsn[0])
        opened.append(store)
        return store

    yield reopen
    for store in opened:
        store.close()


def delivered(forwarding: Forwarding) -> list[tuple]:
    return [row for row in forwarding.queue.rows("arc-1") if row[5] is not None]


@pytest.mark.parametrize("key_text", [None, AES128, AES256], ids=["plain", "aes128", "aes256"])
def test_events_reach_the_arc_and_are_marked_delivered_on_its_ack(tmp_path, store, arcs, key_text):
    arc = arcs([("1234", key_text)])
    config = receiver_config(tmp_path, arc_toml(arc.address, key=key_text is not None), key_text)
    forwarding = Forwarding(config, store)
    forwarding.start()
    try:
        queue_events(forwarding, store, [("1234", zone) for zone in (1, 2, 3)])
        assert wait_until(lambda: len(delivered(forwarding)) == 3, 10)
        events = arc.got()
        assert [(e.code, e.ri, e.account, e.event_qualifier) for e in events] == [
            ("PA", f"{zone:03d}", "1234", "1") for zone in (1, 2, 3)
        ]
        assert all(e.valid_message and e.valid_timestamp and bool(e.encrypted) == bool(key_text) for e in events)
        (state,) = forwarding.queue.status()
        assert (state.connected, state.path, state.depth, state.fault) == (True, "primary", 0, None)
        assert state.last_ack_at is not None
    finally:
        forwarding.close()


def test_stopping_and_restarting_the_arc_and_the_receiver_mid_burst_loses_nothing(tmp_path, open_store, arcs):
    """Every event arrives at least once, in order per account; a copy only ever follows itself.

    DC-09 has the transmitter send an unacknowledged message again under the same sequence number,
    so an ARC can tell a copy whose ACK was lost; pysiaalarm does not de-duplicate, so copies show here.
    """
    accounts = [("1234", AES128), ("5678", AES128)]
    arc = arcs(accounts)
    port = arc.port
    config = receiver_config(tmp_path, arc_toml(arc.address, key=True), AES128)
    zones = [(account, zone) for zone in range(1, 31) for account in ("1234", "5678")]
    lives = [arc]  # the ARC's three lives, one after the other: together, everything it ever received
    store = open_store()
    forwarding = Forwarding(config, store)
    forwarding.start()
    try:
        queue_events(forwarding, store, zones)
        assert wait_until(lambda: len(arc.got()) >= 10, 10)
        arc.stop()  # the ARC goes away mid-burst, and comes back on its address
        assert wait_until(lambda: forwarding.forwarders[0].path is None, 10)
        arc = arcs(accounts, port=port)
        lives.append(arc)
        assert wait_until(lambda: sum(len(life.got()) for life in lives) >= 30, 10)
    finally:
        forwarding.close()  # the receiver stops too, while the ARC is down
        arc.stop()
    lives.append(arcs(accounts, port=port))
    store.close()
    forwarding = Forwarding(config, open_store())  # a new receiver process on the same database
    forwarding.start()
    try:
        assert wait_until(lambda: len(delivered(forwarding)) == len(zones), 20)
    finally:
        forwarding.close()
    received = [event for life in lives for event in life.got()]
    for account in ("1234", "5678"):
        arrived = [int(e.ri) for e in received if e.account == account]
        collapsed = [zone for n, zone in enumerate(arrived) if n == 0 or arrived[n - 1] != zone]
        assert collapsed == [zone for a, zone in zones if a == account]
    rows = forwarding.queue.rows("arc-1")
    assert len({(row[1], row[3]) for row in rows}) == len(zones)  # each row kept its one sequence number


def test_a_stale_clock_is_naked_corrected_from_the_nak_and_sent_again(tmp_path, store, arcs):
    arc = arcs([("1234", None)])
    config = receiver_config(tmp_path, arc_toml(arc.address))
    forwarding = Forwarding(config, store, clock=lambda: time.time() - 300)  # our clock 5 minutes slow
    forwarding.start()
    try:
        queue_events(forwarding, store, [("1234", 7)])
        assert wait_until(lambda: len(delivered(forwarding)) == 1, 10)
    finally:
        forwarding.close()
    forwarder = forwarding.forwarders[0]
    assert forwarder.counts["NAK"] == 1 and forwarder.counts["clock_corrected"] == 1
    assert 290 < forwarder.clock_offset_s < 310
    (event,) = arc.got()
    assert event.valid_timestamp and event.ri == "007"


def test_a_wrong_key_is_a_fault_and_the_events_stay_queued(tmp_path, store, arcs, caplog):
    arc = arcs([("1234", AES128)])
    config = receiver_config(tmp_path, arc_toml(arc.address, key=True), "FEDCBA9876543210")
    forwarding = Forwarding(config, store)
    forwarding.start()
    try:
        with caplog.at_level(logging.ERROR, logger="agent.centre.forwarder"):
            queue_events(forwarding, store, [("1234", 1), ("1234", 2)])
            assert wait_until(lambda: forwarding.forwarders[0].fault is not None, 10)
            (state,) = forwarding.queue.status()
            assert state.fault.startswith("NAK: the ARC refused it") and state.last_nak_at is not None
            assert state.depth == 2 and arc.got() == []
            time.sleep(0.5)  # deliberate: let it retry a few times while the key stays wrong
    finally:
        forwarding.close()
    faults = [r for r in caplog.records if "FAULT" in r.getMessage()]
    assert len(faults) == 1  # logged once when it started, not at every retry
    rows = forwarding.queue.rows("arc-1")
    assert rows[0][4] >= 2 and rows[0][6].startswith("NAK") and rows[1][4] == 0  # only the head is retried
    assert all(row[5] is None for row in rows)


def test_the_backup_path_takes_over_when_the_primary_does_not_answer(tmp_path, store, arcs):
    backup = arcs([("1234", None)])
    config = receiver_config(tmp_path, arc_toml(f"127.0.0.1:{closed_port()}", backup=backup.address))
    forwarding = Forwarding(config, store)
    forwarding.start()
    try:
        queue_events(forwarding, store, [("1234", 1), ("1234", 2)])
        assert wait_until(lambda: len(delivered(forwarding)) == 2, 10)
        (state,) = forwarding.queue.status()
        assert (state.connected, state.path) == (True, "backup")
        assert [e.ri for e in backup.got()] == ["001", "002"]
    finally:
        forwarding.close()


def test_null_messages_supervise_the_path_when_it_is_quiet(tmp_path, store, arcs):
    arc = arcs([("1234", AES128)])
    config = receiver_config(tmp_path, arc_toml(arc.address, key=True, null_interval_s=0.1), AES128)
    forwarding = Forwarding(config, store)
    forwarding.start()
    try:
        assert wait_until(lambda: len(arc.got("NULL")) >= 2, 10)
        assert wait_until(lambda: forwarding.queue.status()[0].last_ack_at is not None, 5)
    finally:
        forwarding.close()
    assert arc.got() == []  # supervision only: no alarm


def test_receivers_sharing_a_database_send_each_event_once(tmp_path, open_store, arcs):
    """Only the holder of an ARC's lease sends for it; when it stops, another receiver takes over."""
    arc = arcs([("1234", None)])
    config = receiver_config(tmp_path, arc_toml(arc.address))
    first_store, second_store = open_store(), open_store()
    first, second = Forwarding(config, first_store), Forwarding(config, second_store)
    first.start()
    second.start()
    try:
        queue_events(first, first_store, [("1234", zone) for zone in range(1, 11)])
        assert wait_until(lambda: len(delivered(second)) == 10, 10)
        (state,) = second.queue.status()
        sender, other = (first, second) if state.holder == first.forwarders[0].holder else (second, first)
        sender.close()  # the sender stops: it gives up its lease, the other takes over
        queue_events(other, other.store, [("1234", zone) for zone in range(11, 16)])
        assert wait_until(lambda: len(delivered(other)) == 15, 10)
    finally:
        first.close()
        second.close()
    assert [int(e.ri) for e in arc.got()] == list(range(1, 16))  # each once, in order


def test_a_duh_holds_back_only_its_own_account(tmp_path, store, arcs, caplog):
    """pysiaalarm answers DUH to a code it does not know: that account waits, the others go on in order."""
    arc = arcs([("1234", None), ("5678", None)])
    config = receiver_config(tmp_path, arc_toml(arc.address))
    forwarding = Forwarding(config, store)
    forwarding.start()
    try:
        with store.transaction():
            forwarding.queue.enqueue(
                [
                    Forward("arc-1", "duh", "1234", "SIA-DCS", sia_dcs("XB", 1, 1), "an unknown SIA code"),
                    Forward("arc-1", "after-duh", "1234", "ADM-CID", contact_id(1, 120, 1, 2), "behind it"),
                    *[Forward("arc-1", f"other:{z}", "5678", "ADM-CID", contact_id(1, 120, 1, z), "") for z in (3, 4)],
                ],
                time.time(),
            )
        forwarding.forwarders[0].wake()
        assert wait_until(lambda: len(delivered(forwarding)) == 2, 10)
        assert wait_until(lambda: (forwarding.forwarders[0].fault or "").startswith("DUH"), 5)
        time.sleep(0.3)  # deliberate: a retry or two of the refused event, while the other account is served
    finally:
        forwarding.close()
    assert (
        len([r for r in caplog.records if "FAULT" in r.getMessage()]) == 1
    )  # the other account's ACKs do not clear it
    assert [(e.account, e.ri) for e in arc.got()] == [("5678", "003"), ("5678", "004")]
    rows = {row[2]: row for row in forwarding.queue.rows("arc-1")}
    assert rows[sia_dcs("XB", 1, 1)][6].startswith("DUH") and rows[contact_id(1, 120, 1, 2)][4] == 0


class SilentArc:
    """A TCP server that takes connections and frames and never answers (a hung ARC)."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.received = 0
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self._connections.append(connection)
            threading.Thread(target=self._swallow, args=(connection,), daemon=True).start()

    def _swallow(self, connection: socket.socket) -> None:
        while True:
            try:
                data = connection.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.received += data.count(b"\r")

    def close(self) -> None:
        self.server.close()
        for connection in self._connections:
            connection.close()


def test_a_silent_primary_fails_over_to_the_backup(tmp_path, store, arcs):
    silent = SilentArc()
    backup = arcs([("1234", None)])
    config = receiver_config(tmp_path, arc_toml(silent.address, backup=backup.address, ack_timeout_s=0.3))
    forwarding = Forwarding(config, store)
    forwarding.start()
    try:
        queue_events(forwarding, store, [("1234", 1), ("1234", 2)])
        assert wait_until(lambda: len(delivered(forwarding)) == 2, 10)
        assert silent.received >= 1  # it was asked first, and said nothing
        assert [e.ri for e in backup.got()] == ["001", "002"]
        (state,) = forwarding.queue.status()
        assert (state.path, state.fault) == ("backup", None)  # the ACK on the backup cleared the fault
        first = forwarding.queue.rows("arc-1")[0]
        assert first[4] >= 1 and first[6] is None  # failed (silence), then delivered
    finally:
        forwarding.close()
        silent.close()
