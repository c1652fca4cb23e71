"""The console's records behave the same on SQLite and PostgreSQL; commits reach the change feed on both."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest

from agent.centre.store import ReceiverStore, StoreError
from agent.console.auth import LoginLimiter, LoginRefused, Sessions, hash_password
from agent.console.fleet import device_marks
from agent.console.live import ChangeFeed, PostgresWatcher, SqliteWatcher
from agent.console.state import ConsoleState
from agent.console.web import alert_sound
from tests.centre.test_store_backends import alert_claims, fresh_database


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """(store, watcher) on a new database of the parametrised engine."""
    if request.param == "sqlite":
        where = tmp_path / "receiver.sqlite"
        with ReceiverStore(where) as store:
            yield store, SqliteWatcher(where, interval_s=0.05)
        return
    from agent.centre.store_postgres import PostgresStore

    dsn = fresh_database(request.getfixturevalue("postgres"))
    with PostgresStore(dsn) as store:
        yield store, PostgresWatcher(dsn)


@pytest.fixture
def state(backend) -> ConsoleState:
    return ConsoleState(backend[0])


def test_one_operator_takes_charge_the_other_is_told_who_and_closing_is_audited(state):
    state.store.insert(alert_claims(seq=1, alert_kind="assistance", location="North gate", silent=False), 10.0)
    (alert,), closed = state.queue()
    assert (alert.state, alert.what, alert.location, closed) == ("open", "assistance", "North gate", [])
    assert state.take(alert, "ana", 11.0)
    assert not state.take(alert, "bo", 11.5)  # compare-and-set: one operator holds it
    assert (state.alert("cp-1", 1).state, state.alert("cp-1", 1).taken_by) == ("taken", "ana")
    assert state.close(alert, "ana", "help-sent", "patrol on site", 12.0)
    assert not state.close(alert, "bo", "false-alarm", "", 13.0)
    open_alerts, (done,) = state.queue()
    assert open_alerts == [] and (done.outcome, done.note, done.closed_by) == ("help-sent", "patrol on site", "ana")
    log = state.audit_log()
    assert [(e.actor, e.action, e.device, e.seq) for e in log] == [
        ("ana", "close", "cp-1", 1),
        ("ana", "take-charge", "cp-1", 1),
    ]
    assert log[0].detail == "help-sent: patrol on site"


def test_a_supervisor_gives_a_taken_alert_to_another_operator_and_it_is_audited(state):
    for name, role in (("ana", "operator"), ("bo", "operator"), ("sam", "supervisor"), ("ian", "installer")):
        state.add_operator(name, "not-a-real-hash", role, 1.0)  # the hash is never checked here
    state.store.insert(alert_claims(seq=1), 10.0)
    (alert,), _ = state.queue()
    assert state.take(alert, "ana", 11.0)
    assert not state.reassign(alert, "sam", "bo", "ana", 12.0)  # sam's page was out of date: ana holds it
    assert not state.reassign(alert, "sam", "ana", "ian", 12.0)  # an installer cannot hold an alert
    assert not state.reassign(alert, "sam", "ana", "nobody", 12.0)
    assert state.reassign(alert, "sam", "ana", "bo", 12.5)
    now = state.alert("cp-1", 1)
    assert (now.state, now.taken_by, now.taken_at) == ("taken", "bo", 12.5)
    assert state.close(alert, "bo", "help-sent", "", 13.0)
    assert not state.reassign(alert, "sam", "bo", "ana", 14.0)  # closed: nobody holds it any more
    entry = state.audit_log()[1]
    assert (entry.actor, entry.action, entry.device, entry.seq, entry.detail) == (
        "sam",
        "reassign",
        "cp-1",
        1,
        "from ana to bo",
    )
    assert state.handlers() == ["ana", "bo", "sam"]


def test_the_audit_log_refuses_updates_and_deletes(state):
    state.audit(1.0, "ana", "login")
    for sql in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log"):
        with pytest.raises((StoreError, sqlite3.Error), match="append-only"), state.store.transaction():
            state.store.run_all([(sql, ())])
    assert [e.actor for e in state.audit_log()] == ["ana"]


def test_accounts_are_argon2_and_a_name_is_taken_once(state):
    assert state.add_operator("ana", hash_password("long enough pw"), "operator", 1.0)
    assert not state.add_operator("ana", hash_password("another one!"), "supervisor", 2.0)
    assert state.add_operator("ana", hash_password("another one!"), "supervisor", 2.0, replace=True)
    stored, role = state.operator("ana")
    assert stored.startswith("$argon2id$") and role == "supervisor"
    with pytest.raises(ValueError, match="role 'root'"):
        state.add_operator("root", hash_password("x" * 12), "root", 3.0)
    sessions = Sessions(state, LoginLimiter(5, 60), idle_s=60)
    assert sessions.login("ana", "another one!", "10.0.0.1").role == "supervisor"
    with pytest.raises(LoginRefused, match="wrong name or password"):
        sessions.login("nobody", "another one!", "10.0.0.1")


def test_limiter_locks_a_name_after_five_and_an_address_only_after_many_more():
    now = [0.0]
    limiter = LoginLimiter(5, 300, clock=lambda: now[0])
    for _ in range(5):
        limiter.failed("name:ana", "address:proxy")
    assert limiter.refused("name:ana") and not limiter.refused("name:bo", "address:proxy")
    now[0] = 301.0
    assert not limiter.refused("name:ana")  # the lockout is over


def test_every_commit_reaches_the_change_feed(backend):
    """A receiver's insert and a console's take, from other connections: each moves the feed's version."""
    store, watcher = backend
    feed = ChangeFeed(watcher)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        asyncio.run_coroutine_threadsafe(_start(feed), loop).result(5)
        time.sleep(0.3)  # the watcher has its first reading (PostgreSQL: it listens)
        seen = feed.version
        store.insert(alert_claims(seq=1), 10.0)
        seen = asyncio.run_coroutine_threadsafe(feed.next_change(seen, 5.0), loop).result(6)
        assert seen > 0
        state = ConsoleState(store)
        (alert,), _ = state.queue()
        before = seen
        state.take(alert, "ana", 11.0)
        deadline = time.monotonic() + 5
        while feed.version == before and time.monotonic() < deadline:
            asyncio.run_coroutine_threadsafe(feed.next_change(before, 1.0), loop).result(2)
        assert feed.version > before
    finally:
        feed.close()
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)


async def _start(feed: ChangeFeed) -> None:
    feed.start(asyncio.get_running_loop())


def test_the_alert_sound_is_a_short_wav_made_here():
    import io
    import wave

    with wave.open(io.BytesIO(alert_sound())) as wav:
        assert (wav.getnchannels(), wav.getframerate()) == (1, 16000)
        assert 0.3 < wav.getnframes() / wav.getframerate() < 1.5


def test_alerts_from_a_device_with_a_wrong_clock_or_a_gap_are_marked(state):
    store = state.store
    store.insert(alert_claims(seq=5, prev=3), 10.0)
    store.follow_chain("cp-1", 5, 3, 10.0)  # seq 3 was named but never arrived
    store.run_all([("INSERT INTO devices (device, site, clock_skew_s) VALUES (?, ?, ?)", ("cp-1", "site-a", -95.0))])
    marks = device_marks(store, clock_fault_s=30)
    assert marks.clock_fault == {"cp-1": -95.0} and marks.gaps == {"cp-1": [3]}
    assert device_marks(store, clock_fault_s=120).clock_fault == {}
    before = state.queue_signature()
    store.follow_chain("cp-1", 3, 0, 11.0)  # the gap fills: the queue's marks change
    assert state.queue_signature() != before
