"""The receiver's store behaves the same on SQLite and on a real PostgreSQL: one interface, two backends."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from agent.centre.keyring import Keyring
from agent.centre.receiver import MessageChecker, Receiver
from agent.centre.store import SCHEMA_VERSION, ReceiverStore, SchemaTooNew, StoreError, open_store
from agent.cli import main
from agent.config.centre import load_receiver_config
from agent.device.agent import Agent
from agent.protocol.enrolment import enrolment_record
from agent.protocol.messages import MessageClaims, TopicLayout, new_claims
from agent.protocol.signing import MessageSigner, generate_private_key
from hw.gpio import IndicatorState
from tests.conftest import wait_until

psycopg = pytest.importorskip("psycopg")
from agent.centre.store_postgres import PostgresStore  # noqa: E402 - only once psycopg is known to be there

ALERT_TOPIC = "edge/site-a/cp-1/alert"


def fresh_database(postgres) -> str:
    """A new, empty database on the session's server: its DSN."""
    name = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return postgres.dsn.replace("/postgres?", f"/{name}?")


@pytest.fixture(params=["sqlite", "postgres"])
def reopen(request, tmp_path):
    """Opens the store (again) on one database of the parametrised backend."""
    if request.param == "sqlite":
        where = tmp_path / "receiver.sqlite"
        return lambda: ReceiverStore(where)
    dsn = fresh_database(request.getfixturevalue("postgres"))
    return lambda: PostgresStore(dsn)


@pytest.fixture
def store(reopen):
    with reopen() as opened:
        yield opened


def alert_claims(seq=1, device="cp-1", prev=None, **body) -> dict:
    claims = new_claims(device=device, site="site-a", seq=seq, kind="alert", body={"button": "help", **body})
    return {**claims, "prev": prev} if prev is not None else claims


def model(claims: dict) -> MessageClaims:
    return MessageClaims.model_validate(claims)


def checker_on(store, tmp_path):
    """The receiver's checks on ``store``, with cp-1 of site-a enrolled; and how cp-1 signs."""
    key = generate_private_key(tmp_path / "device.pem")
    keyring = Keyring(tmp_path / "keyring")
    keyring.enroll(enrolment_record("cp-1", "site-a", "call-point", key))
    return MessageChecker(keyring, store, TopicLayout("edge")), MessageSigner(key).sign


def test_a_second_copy_of_device_and_sequence_is_not_stored(store):
    first = alert_claims(seq=5)
    assert store.insert(first, 100.0) is True
    assert store.insert(alert_claims(seq=5), 101.0) is False  # another event on the same sequence
    (stored,) = store.messages()
    assert (stored.seq, stored.event_id, stored.received_at, stored.test) == (5, first["event_id"], 100.0, False)
    assert store.find("cp-1", 5).claims == first
    assert store.find("cp-1", 6) is None


def test_another_event_on_a_known_sequence_is_replayed_and_a_resend_a_duplicate(store, tmp_path):
    checker, sign = checker_on(store, tmp_path)
    claims = alert_claims(seq=7)
    assert checker.check(ALERT_TOPIC, sign(claims).encode()).outcome == "accepted"
    assert checker.check(ALERT_TOPIC, sign({**claims, "sent": time.time()}).encode()).outcome == "duplicate"
    replay = checker.check(ALERT_TOPIC, sign(alert_claims(seq=7)).encode())
    assert (replay.outcome, replay.reason) == ("rejected", "replayed")
    assert [m.event_id for m in store.messages()] == [claims["event_id"]]


def refuse_inserts(store) -> None:
    """The database refuses every new message from now on, as a full disk or a lost server would."""
    if isinstance(store, PostgresStore):
        store._db.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE 'disk full'; END $$"
        )
        store._db.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages EXECUTE FUNCTION refuse()")
    else:
        store._db.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'disk full'); END")


def test_a_message_the_database_refuses_is_store_failed_never_acknowledged(store, tmp_path):
    checker, sign = checker_on(store, tmp_path)
    refuse_inserts(store)
    verdict = checker.check(ALERT_TOPIC, sign(alert_claims(seq=1)).encode())
    assert (verdict.outcome, verdict.reason) == ("rejected", "store_failed")
    assert "disk full" in verdict.detail
    assert store.messages() == []


def test_a_batch_rolled_back_leaves_nothing_to_acknowledge(store):
    registry = store.registry(90)
    claims = alert_claims(seq=3, prev=2)
    with pytest.raises(RuntimeError), store.transaction():
        store.insert(claims, 100.0)
        registry.heard(model(claims), 100.0)
        with store.transaction():  # nested: part of the outer one
            assert store.follow_chain("cp-1", 3, 2, 100.0) == (2, False)
        raise RuntimeError("the batch failed before its commit")
    assert store.messages() == [] and store.outstanding() == [] and registry.states() == []
    with store.transaction():  # and the store is usable afterwards
        assert store.insert(claims, 100.0)
    assert [m.seq for m in store.messages()] == [3]


def test_the_registry_reports_missing_once_and_back_once(store):
    registry = store.registry(supervision_s=10)
    claims = model(alert_claims(seq=1))
    assert registry.heard(claims, now=1000.0) is None
    assert registry.check([("cp-1", "site-a"), ("cp-2", "site-a")], now=1005.0) == []
    missing = registry.check([("cp-1", "site-a")], now=1011.0)
    assert [(e.device, e.event) for e in missing] == [("cp-1", "missing")]
    assert registry.check([("cp-1", "site-a")], now=1020.0) == []  # reported once
    back = registry.heard(claims, now=1030.0)
    assert (back.device, back.event) == ("cp-1", "back")
    assert registry.heard(claims, now=1031.0) is None
    registry.note_clock("cp-1", -3.14)
    (state,) = [s for s in registry.states() if s.device == "cp-1"]
    assert (state.status, state.missing, state.last_seen, state.clock_skew_s) == ("online", False, 1031.0, -3.1)
    assert [(e[1], e[3]) for e in registry.events()] == [("cp-1", "missing"), ("cp-1", "back")]


def test_several_receivers_on_one_database_report_each_transition_once(reopen):
    """Every receiver runs supervision; the row they all update decides who reports a transition."""
    with reopen() as first, reopen() as second:
        registries = [first.registry(supervision_s=10), second.registry(supervision_s=10)]
        claims = model(alert_claims(seq=1))
        registries[0].heard(claims, now=1000.0)
        missing = [e for r in registries for e in r.check([("cp-1", "site-a")], now=1011.0)]
        assert [(e.device, e.event) for e in missing] == [("cp-1", "missing")]
        back = [registry.heard(claims, now=1020.0) for registry in registries]
        assert [(e.device, e.event) for e in back if e is not None] == [("cp-1", "back")]
        assert [(e[1], e[3]) for e in registries[1].events()] == [("cp-1", "missing"), ("cp-1", "back")]


def test_receivers_checking_at_the_same_moment_still_report_each_device_once(reopen):
    import threading

    fleet = [(f"cp-{n}", "site-a") for n in range(100)]
    with reopen() as first, reopen() as second:
        for device, _ in fleet:
            first.registry(10).heard(model(alert_claims(seq=1, device=device)), now=1000.0)
        registries = [first.registry(10), second.registry(10)]
        start = threading.Barrier(2)
        reported: list = []

        def supervise(registry):
            start.wait()
            reported.extend(registry.check(fleet, now=1011.0))

        threads = [threading.Thread(target=supervise, args=(r,)) for r in registries]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert sorted(e.device for e in reported) == sorted(device for device, _ in fleet)


def test_telemetry_is_kept_and_a_last_will_marks_offline(store):
    registry = store.registry(90)
    telemetry = new_claims(device="cp-1", site="site-a", seq=1, kind="telemetry", body={"version": "1.2\x00"})
    registry.heard(model(telemetry), 10.0)
    will = new_claims(device="cp-1", site="site-a", seq=2, kind="status", body={"state": "offline"})
    registry.announced_offline(model(will), 20.0)
    (state,) = registry.states()
    assert (state.status, state.last_telemetry) == ("offline", {"version": "1.2\x00"})


def test_the_outstanding_chain_is_noted_and_filled(store):
    store.insert(alert_claims(seq=1), 1.0)
    assert store.follow_chain("cp-1", 1, None, 1.0) == (None, False)
    store.insert(alert_claims(seq=4, prev=3), 2.0)
    assert store.follow_chain("cp-1", 4, 3, 2.0) == (3, False)
    assert store.follow_chain("cp-1", 4, 3, 2.5) == (3, False)  # noted once
    assert store.outstanding() == [("cp-1", 3, 2.0)] and store.outstanding("cp-9") == []
    store.insert(alert_claims(seq=3, prev=1), 3.0)
    assert store.follow_chain("cp-1", 3, 1, 3.0) == (None, True)
    assert store.outstanding() == []


def test_retention_deletes_old_messages_and_device_events(store):
    registry = store.registry(supervision_s=10)
    store.insert(alert_claims(seq=1), 100.0)
    store.insert(alert_claims(seq=2), 200.0)
    registry.check([("cp-2", "site-a")], now=registry.started_at + 11)
    assert store.prune(150.0) == 1
    assert [m.seq for m in store.messages()] == [2]
    assert store.prune(time.time() + 3600) == 2  # the last message and the missing event
    assert store.messages() == [] and registry.events() == []


def test_messages_are_listed_by_kind_and_device(store):
    store.insert(alert_claims(seq=1, device="cp-1"), 1.0)
    store.insert(alert_claims(seq=1, device="cp-2"), 1.0)
    store.insert(new_claims(device="cp-1", site="site-a", seq=2, kind="telemetry", body={}), 1.0)
    assert [(m.device, m.kind) for m in store.messages(kind="alert")] == [("cp-1", "alert"), ("cp-2", "alert")]
    assert [m.seq for m in store.messages(device="cp-1")] == [1, 2]
    assert [m.device for m in store.messages(kind="alert", device="cp-2")] == ["cp-2"]


def test_a_newer_schema_is_refused_with_a_clear_error(reopen):
    with reopen() as store:
        assert store.schema_version() == SCHEMA_VERSION
    with reopen() as store:  # opening again migrates nothing
        assert store.schema_version() == SCHEMA_VERSION
        with store.transaction():
            store._db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}, newer than this receiver"):
        reopen()


def test_an_sqlite_database_from_before_versions_is_migrated(tmp_path):
    import sqlite3

    where = tmp_path / "old.sqlite"
    with sqlite3.connect(where) as old:
        old.execute(
            "CREATE TABLE devices (device TEXT PRIMARY KEY, site TEXT NOT NULL, last_seen REAL,"
            " status TEXT NOT NULL DEFAULT 'unknown', missing INTEGER NOT NULL DEFAULT 0, last_telemetry TEXT)"
        )
        old.execute("INSERT INTO devices (device, site) VALUES ('cp-1', 'site-a')")
    old.close()
    with ReceiverStore(where) as store:
        assert store.schema_version() == SCHEMA_VERSION
        store.registry(90).note_clock("cp-1", 5.0)
        assert [s.clock_skew_s for s in store.registry(90).states()] == [5.0]


def test_postgres_rolls_back_a_transaction_whose_statement_failed_even_if_swallowed(postgres):
    with PostgresStore(fresh_database(postgres)) as store:
        with pytest.raises(StoreError, match="rolled back"), store.transaction():
            store.insert(alert_claims(seq=1), 1.0)
            with pytest.raises(StoreError):
                store._db.execute("INSERT INTO messages (device) VALUES (?)", ("cp-1",))  # NOT NULL fails
        assert store.messages() == []


def test_postgres_reconnects_after_losing_its_connection_between_transactions(postgres):
    with PostgresStore(fresh_database(postgres)) as store:
        store.insert(alert_claims(seq=1), 1.0)
        kill_connection(postgres, store)
        with pytest.raises(StoreError):  # the statement that finds it gone fails: the message would be sent again
            store.find("cp-1", 1)
        assert [m.seq for m in store.messages()] == [1]
        kill_connection(postgres, store)
        with store.transaction():  # a batch after a server restart: BEGIN finds the connection dead, opens another
            assert store.insert(alert_claims(seq=2), 2.0)
        assert [m.seq for m in store.messages()] == [1, 2]


def test_postgres_fails_a_transaction_that_loses_its_connection(postgres):
    with PostgresStore(fresh_database(postgres)) as store:
        with pytest.raises(StoreError), store.transaction():
            store.insert(alert_claims(seq=1), 1.0)
            kill_connection(postgres, store)
            store.insert(alert_claims(seq=2), 1.0)
        assert store.messages() == []


def kill_connection(postgres, store) -> None:
    """The server ends the store's session, as a restart or a failover would."""
    pid = store._db.execute("SELECT pg_backend_pid()").fetchone()[0]
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_postgres_commits_synchronously(postgres):
    with PostgresStore(fresh_database(postgres)) as store:
        assert store._db.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_the_config_chooses_the_backend(site, postgres):
    config = site.receiver_config
    assert config.database_dsn is None
    with open_store(config) as store:
        assert type(store) is ReceiverStore and store.path == config.database_path
    dsn = fresh_database(postgres)
    with open_store(with_database(config, dsn)) as store:
        assert isinstance(store, PostgresStore) and store.dsn == dsn


def with_database(config, database: str):
    return config.model_copy(update={"receiver": config.receiver.model_copy(update={"database": database})})


def test_a_receiver_on_postgres_stores_an_alert_and_acknowledges_it(site, postgres, mock_factory, capsys):
    config_path = postgres_config(site, fresh_database(postgres))
    config = load_receiver_config(config_path)
    device = site.add_device("cp-1", body='[[buttons]]\nname = "help"\npin = 17\n\n[indicator]\nled_pin = 5\n')
    with Receiver(config) as receiver, Agent(device, pin_factory=mock_factory) as agent:
        assert isinstance(receiver.store, PostgresStore)
        assert receiver.link.wait_subscribed(10) and agent.link.wait_connected(10)
        pin = mock_factory.pin(17)
        pin.drive_low()
        pin.drive_high()
        assert wait_until(lambda: agent.indicator_state() is IndicatorState.ACKNOWLEDGED, 15)
        assert wait_until(lambda: agent.delivery.stats.acknowledged >= 1, 10)
        (alert,) = receiver.store.messages(kind="alert")
        assert (alert.device, alert.claims["body"]["button"]) == ("cp-1", "help")
    with PostgresStore(config.database_dsn) as store:  # on the server, not in the receiver's memory
        assert [m.kind for m in store.messages(kind="alert")] == ["alert"]
    assert main(["receiver", "devices", "--config", str(config_path), "--json"]) == 0  # the CLI reads it there too
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["device"], row["enrolled"]) == ("cp-1", "yes") and row["last_seen"].endswith(" s ago")
    assert row["state"] in ("online", "offline")  # offline once its clean stop arrived before the receiver's


def postgres_config(site, dsn: str) -> Path:
    """The site's receiver.toml, storing in PostgreSQL."""
    path = site.receiver_toml_path().with_name("receiver-postgres.toml")
    path.write_text(
        site.receiver_toml_path().read_text().replace("[receiver]\n", f'[receiver]\ndatabase = "{dsn}"\n', 1)
    )
    return path


@pytest.mark.parametrize("database", ["host=db dbname=edge", "mysql://db/edge", "sqlite:///x"])
def test_a_database_that_is_neither_a_postgresql_uri_nor_a_file_is_refused(database):
    from pydantic import ValidationError

    from agent.config.centre import ReceiverSection

    with pytest.raises(ValidationError, match="postgresql:// URI"):
        ReceiverSection(database=database)
    assert ReceiverSection(database="postgres://edge@db/edge").database.startswith("postgres://")


def test_an_up_to_date_sqlite_database_opens_beside_a_writer(tmp_path):
    where = tmp_path / "receiver.sqlite"
    ReceiverStore(where).close()
    with ReceiverStore(where) as writer, writer.transaction():
        writer.insert(alert_claims(seq=1), 1.0)
        with ReceiverStore(where) as reader:  # the CLI beside a receiver mid-batch: no write lock needed
            assert reader.messages() == []


def test_receivers_starting_together_migrate_a_new_postgres_database_once(postgres):
    from concurrent.futures import ThreadPoolExecutor

    dsn = fresh_database(postgres)
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: PostgresStore(dsn), range(4)))
    for store in stores:
        store.close()
    with psycopg.connect(dsn) as db:
        versions = db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]  # each step once


def test_a_batch_of_sightings_is_written_as_one_by_one(store):
    """Coalesced per device, in order: life, the last will between, the latest clock and telemetry."""
    from agent.centre.registry import Sighting

    registry = store.registry(10)
    registry.heard(model(alert_claims(seq=1)), now=1000.0)
    assert [e.event for e in registry.check([("cp-1", "site-a")], now=1020.0)] == ["missing"]
    telemetry = model(new_claims(device="cp-1", site="site-a", seq=3, kind="telemetry", body={"outbox": 2}))
    will = model(new_claims(device="cp-1", site="site-a", seq=4, kind="status", body={"state": "offline"}))
    other = model(alert_claims(seq=1, device="cp-2"))
    with store.transaction():
        backs = registry.note(
            [
                Sighting(model(alert_claims(seq=2)), 1030.0, alive=True, clock_error_s=1.0),
                Sighting(other, 1030.5, alive=True),
                Sighting(telemetry, 1031.0, alive=True, clock_error_s=-2.0),
                Sighting(will, 1032.0, offline=True),
            ]
        )
    assert {n: (e.device, e.event) for n, e in backs.items()} == {0: ("cp-1", "back")}
    states = {s.device: s for s in registry.states()}
    cp1 = states["cp-1"]
    assert (cp1.status, cp1.last_seen, cp1.missing, cp1.clock_skew_s) == ("offline", 1031.0, False, -2.0)
    assert cp1.last_telemetry == {"outbox": 2} and states["cp-2"].status == "online"
    assert [(e[1], e[3]) for e in registry.events()] == [("cp-1", "missing"), ("cp-1", "back")]


def test_chains_followed_together_count_the_whole_batch_as_had(store):
    """seq 3 naming 2 and seq 2 itself in one batch: no gap; a gap before 2 is noted once."""
    with store.transaction():
        store.store_many([(alert_claims(seq=3, prev=2), 1.0), (alert_claims(seq=2, prev=1), 1.0)])
        assert store.follow_chains([("cp-1", 3, 2, 1.0), ("cp-1", 2, 1, 1.0)]) == [(None, False), (1, False)]
    assert store.outstanding() == [("cp-1", 1, 1.0)]


def test_storing_many_reads_back_what_each_sequence_holds(store):
    first, other = alert_claims(seq=5), alert_claims(seq=5)
    again = dict(first)  # the same event once more: a redelivery
    with store.transaction():
        stored = store.store_many([(first, 1.0), (again, 1.1), (other, 1.2), (alert_claims(seq=6), 1.3)])
    event = str(first["event_id"])
    assert stored[:3] == [(event, True), (event, False), (event, False)]
    assert stored[3][1] is True and [m.seq for m in store.messages()] == [5, 6]


def test_a_batch_finds_what_earlier_batches_stored(store):
    """Redelivered and replayed sequences from before this batch read back the event stored then."""
    earlier = alert_claims(seq=7)
    with store.transaction():
        store.store_many([(earlier, 1.0)])
    replay, redelivery = alert_claims(seq=7), dict(earlier)
    with store.transaction():
        stored = store.store_many([(replay, 2.0), (alert_claims(seq=8), 2.0), (redelivery, 2.1)])
    event = str(earlier["event_id"])
    assert stored[0] == (event, False) and stored[1][1] is True and stored[2] == (event, False)
    assert [(m.seq, m.event_id) for m in store.messages()][0] == (7, event)


def test_a_batch_of_many_devices_brings_back_only_the_missing_one(store):
    """One row write per device: the missing one comes back once, the others keep their telemetry and clock."""
    from agent.centre.registry import Sighting

    registry = store.registry(10)
    for device in ("cp-1", "cp-2", "cp-3"):
        registry.heard(model(alert_claims(seq=1, device=device)), now=1000.0)
    registry.heard(model(alert_claims(seq=2, device="cp-2")), now=1015.0)
    registry.heard(model(alert_claims(seq=2, device="cp-3")), now=1015.0)
    enrolled = [(device, "site-a") for device in ("cp-1", "cp-2", "cp-3")]
    assert [e.device for e in registry.check(enrolled, now=1020.0)] == ["cp-1"]
    telemetry = model(new_claims(device="cp-3", site="site-a", seq=3, kind="telemetry", body={"outbox": 0}))
    with store.transaction():
        backs = registry.note(
            [
                Sighting(model(alert_claims(seq=3, device="cp-2")), 1021.0, alive=True, clock_error_s=0.5),
                Sighting(model(alert_claims(seq=2, device="cp-1")), 1022.0, alive=True),
                Sighting(telemetry, 1023.0, alive=True),
            ]
        )
    assert {n: (e.device, e.event) for n, e in backs.items()} == {1: ("cp-1", "back")}
    states = {s.device: s for s in registry.states()}
    assert [states[d].last_seen for d in ("cp-1", "cp-2", "cp-3")] == [1022.0, 1021.0, 1023.0]
    assert states["cp-2"].clock_skew_s == 0.5 and states["cp-3"].last_telemetry == {"outbox": 0}
    assert not any(state.missing for state in states.values())


def test_supervision_passes_over_the_fleet_only_when_someone_may_be_overdue(reopen):
    """The same enrolled list checked every second: deadlines still hold when another receiver hears a device."""
    with reopen() as first, reopen() as second:
        ours, theirs = first.registry(10), second.registry(10)
        ours.started_at = theirs.started_at = 995.0
        fleet = [("cp-1", "site-a"), ("cp-2", "site-a")]
        ours.heard(model(alert_claims(seq=1)), now=1000.0)
        assert [(e.device, e.event) for e in ours.check(fleet, now=1006.0)] == [("cp-2", "missing")]
        assert ours.check(fleet, now=1007.0) == []
        theirs.heard(model(alert_claims(seq=2)), now=1008.0)  # cp-1 heard by the other receiver
        assert ours.check(fleet, now=1011.0) == []
        assert [(e.device, e.event) for e in ours.check(fleet, now=1018.5)] == [("cp-1", "missing")]
