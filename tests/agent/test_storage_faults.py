"""Every accepted press reaches the centre through a full disk, a failing store, a kill -9 and a second agent.

The full disk is real: a small tmpfs mounted on the device's state directory and
filled with a file until the kernel says ENOSPC (we run as root; without mount
rights these tests are skipped and say why).
"""

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from agent.device.agent import Agent
from agent.device.control import request
from agent.device.outbox import Outbox
from agent.device.reserve import SequenceFloor, SpaceReserve, free_bytes
from agent.errors import ControlError, OutboxError
from agent.protocol.messages import new_claims
from hw.gpio import IndicatorState
from tests.conftest import agent_run_argv, wait_until

BUTTONS = '[[buttons]]\nname = "help"\npin = 17\n\n[indicator]\nled_pin = 5\n'


def press(pin):
    pin.drive_low()
    pin.drive_high()
    time.sleep(0.04)  # past the bounce lockout


@contextlib.contextmanager
def small_filesystem(directory: Path, size: str = "4m"):
    """A real filesystem of ``size`` on ``directory`` (tmpfs), unmounted afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: cannot make a small filesystem to fill")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill_disk(directory: Path) -> Path:
    """Write a file until the filesystem refuses another byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        for chunk in (65536, 4096, 512, 1):
            try:
                while True:
                    out.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    assert free_bytes(directory) == 0
    return filler


def device_with_small_disk(site, device_id: str, reserve_kb: int, body: str = BUTTONS):
    config = site.add_device(device_id, body=body, outbox=f"reserve_kb = {reserve_kb}\n")
    return config


def run_agent(site, device_id: str) -> subprocess.Popen:
    return subprocess.Popen(
        agent_run_argv(site.device_config_path(device_id)),
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_socket(config, process: subprocess.Popen) -> None:
    def answering():
        assert process.poll() is None, process.stderr.read()
        try:
            return request(config.control_socket, "status", timeout=2)["connected"]
        except ControlError:
            return False

    assert wait_until(answering, 30), "the agent did not come up"


def stop(process: subprocess.Popen, sig=signal.SIGTERM) -> str:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        _, err = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return err


# The reserve itself.


def test_reserve_is_real_blocks_given_back_in_steps_and_grown_back(tmp_path):
    with small_filesystem(tmp_path / "disk", "2m") as disk:
        reserve = SpaceReserve(disk / "outbox.sqlite.reserve", 512 * 1024, step=128 * 1024)
        assert reserve.top_up() == 512 * 1024
        assert os.stat(reserve.path).st_blocks * 512 >= 512 * 1024  # allocated, not sparse
        assert not reserve.in_use
        filler = fill_disk(disk)
        assert reserve.release_step() == 128 * 1024
        assert reserve.in_use and reserve.held == 384 * 1024
        assert free_bytes(disk) >= 128 * 1024  # the freed blocks are there for the next write
        assert reserve.top_up() == 0  # not while the disk is full
        filler.unlink()
        assert reserve.top_up() == 128 * 1024 and not reserve.in_use
        for _ in range(4):
            reserve.release_step()
        assert reserve.held == 0 and reserve.release_step() == 0  # exhausted


def test_sequence_floor_is_written_in_place_and_survives_a_torn_slot(tmp_path):
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        floor = SequenceFloor(disk / "outbox.sqlite.seq")
        fill_disk(disk)
        for seq in (7, 8, 9):
            floor.raise_to(seq)  # no new blocks needed on the full disk
        assert floor.read() == 9
        with open(floor.path, "r+b") as raw:  # the slot written last is torn by a power cut
            slot = 0 if raw.read(512).startswith(b"9 ") else 512
            raw.seek(slot)
            raw.write(b"1\x00\x00")
        assert floor.read() == 8  # the other slot still holds the previous floor


def test_outbox_sequence_numbers_stay_unique_when_they_come_from_the_floor(tmp_path):
    with Outbox(tmp_path / "o.sqlite") as outbox:
        first = outbox.add("alert", True, lambda seq: new_claims(device="d", site="s", seq=seq, kind="alert", body={}))
        db = outbox._db
        with outbox._lock:
            db.execute("CREATE TEMP TRIGGER refuse BEFORE UPDATE ON counters BEGIN SELECT RAISE(ABORT, 'no'); END")
        held = outbox.next_sequence()  # the database refuses: the floor file gives the number
        assert held == first.seq + 1
    with Outbox(tmp_path / "o.sqlite") as outbox:  # a restart (kill -9) before the held message was stored
        again = outbox.add("alert", True, lambda seq: new_claims(device="d", site="s", seq=seq, kind="alert", body={}))
        assert again.seq == held + 1  # never the held message's number


def test_outbox_opens_and_commits_on_a_disk_that_is_still_full_at_restart(tmp_path):
    def alert(seq):
        return new_claims(device="d", site="s", seq=seq, kind="alert", body={})

    with small_filesystem(tmp_path / "disk", "2m") as disk:
        with Outbox(disk / "o.sqlite", reserve_bytes=512 * 1024) as outbox:
            first = outbox.add("alert", True, alert)
        fill_disk(disk)  # the -wal and -shm files are gone and cannot be created without room
        with Outbox(disk / "o.sqlite", reserve_bytes=512 * 1024) as outbox:
            assert outbox.add("alert", True, alert).seq == first.seq + 1
            assert outbox.reserve.releases >= 1 and outbox.reserve.in_use
            with pytest.raises(OutboxError, match="kept for alerts; telemetry not stored"):
                outbox.add(
                    "telemetry", False, lambda seq: new_claims(device="d", site="s", seq=seq, kind="telemetry", body={})
                )
            assert [e.seq for e in outbox.entries()] == [first.seq, first.seq + 1]


def test_every_outbox_read_raises_outbox_error(tmp_path):
    outbox = Outbox(tmp_path / "o.sqlite")
    outbox._db.close()  # the database is gone from under it
    for read in (
        lambda: outbox.unpublished(10),
        outbox.depth,
        outbox.oldest_age_s,
        outbox.entries,
        lambda: outbox.mark_published(1),
        lambda: outbox.add("alert", True, lambda seq: new_claims(device="d", site="s", seq=seq, kind="alert", body={})),
    ):
        with pytest.raises(OutboxError, match=r"outbox .*o\.sqlite"):
            read()
    assert outbox.is_responsive() is False


# A full disk with a live agent, a receiver and a real broker.


def test_presses_on_a_full_disk_are_stored_in_the_reserve_and_delivered(site, receiver, mock_factory):
    config = device_with_small_disk(site, "cp-full", reserve_kb=512, body=BUTTONS + "[telemetry]\ninterval_s = 5\n")
    with small_filesystem(config.state_dir, "4m"):
        with Agent(config, pin_factory=mock_factory) as agent:
            assert agent.link.wait_connected(10)
            ballast = config.outbox_path.with_name("outbox.sqlite.reserve")
            assert os.stat(ballast).st_blocks * 512 >= 512 * 1024  # set aside with real blocks at start
            filler = fill_disk(config.state_dir)
            for _ in range(5):
                press(mock_factory.pin(17))
                assert agent._unstored == []  # stored, not held: on disk before it was accepted
            assert agent.outbox.reserve.releases >= 1
            assert wait_until(lambda: len(receiver.store.messages(kind="alert", device="cp-full")) == 5, 15)
            assert wait_until(lambda: agent.indicator_state() is IndicatorState.ACKNOWLEDGED, 10)
            assert "disk full" in agent.health()["storage_fault"]
            assert wait_until(lambda: _storage_events(receiver, "cp-full", "disk_full") == ["fault"], 10)
            assert wait_until(lambda: _heartbeat_faults(receiver, "cp-full")[-1:] != [None], 10)  # sent directly
            assert "disk full" in _heartbeat_faults(receiver, "cp-full")[-1]
            assert not [e for e in agent.outbox.entries() if e.kind == "telemetry"]  # the reserve is for alerts
            filler.unlink()  # space is back: the reserve is set aside again and the centre is told
            assert wait_until(lambda: not agent.outbox.reserve.in_use, 10)
            assert wait_until(lambda: _storage_events(receiver, "cp-full", "disk_full") == ["fault", "recovered"], 10)
            assert agent.health()["storage_fault"] is None


def test_press_with_the_reserve_exhausted_is_held_sent_directly_then_stored_once(
    site, receiver, verdicts, mock_factory
):
    config = device_with_small_disk(site, "cp-held", reserve_kb=64)
    with small_filesystem(config.state_dir, "4m"):
        with Agent(config, pin_factory=mock_factory) as agent:
            assert agent.link.wait_connected(10)
            filler = fill_disk(config.state_dir)
            presses = 0
            while not agent._unstored and presses < 80:  # until the reserve is used up
                press(mock_factory.pin(17))
                presses += 1
            assert agent._unstored, "the 64 KiB reserve was never exhausted"
            press(mock_factory.pin(17))  # one more, behind the held one
            presses += 1
            held_seqs = lambda: [m.claims["seq"] for m in agent._unstored if m.claims]  # noqa: E731
            assert wait_until(lambda: len(held_seqs()) == len(agent._unstored), 5)
            assert agent.indicator_state() is IndicatorState.FAULT  # never "pending" for a press not on disk
            assert "held in memory" in agent.health()["storage_fault"]
            # Sent without the outbox: the centre has every press while the device still holds some.
            assert wait_until(lambda: len(receiver.store.messages(kind="alert", device="cp-held")) == presses, 15)
            assert agent._unstored
            filler.unlink()  # storage works again
            assert wait_until(lambda: not agent._unstored, 10)
            assert wait_until(lambda: not [e for e in agent.outbox.entries() if e.kind == "alert"], 20)
            assert wait_until(lambda: _storage_events(receiver, "cp-held", "storage") == ["recovered"], 10)
            assert wait_until(lambda: agent.health()["storage_fault"] is None, 10)  # and the reserve is back
    alerts = receiver.store.messages(kind="alert", device="cp-held")
    assert sorted(m.seq for m in alerts) == [m.seq for m in alerts] and len({m.seq for m in alerts}) == presses
    accepted = [v.claims.seq for v in verdicts.accepted("alert") if v.claims.device == "cp-held"]
    assert len(accepted) == len(set(accepted)) == presses  # raised once each at the centre
    assert any(v.claims.seq in set(accepted) for v in verdicts.with_outcome("duplicate"))  # the stored copies


def _heartbeat_faults(receiver, device: str) -> list:
    return [m.claims["body"].get("storage_fault") for m in receiver.store.messages(kind="telemetry", device=device)]


def _storage_events(receiver, device: str, fault: str) -> list[str]:
    return [
        m.claims["body"]["state"]
        for m in receiver.store.messages(kind="event", device=device)
        if m.claims["body"].get("fault") == fault
    ]


# A subprocess agent killed while the disk is full.


def test_agent_killed_on_a_full_disk_right_after_presses_loses_none_of_them(site, broker, verdicts):
    from agent.centre.receiver import Receiver

    config = device_with_small_disk(site, "cp-kill", reserve_kb=512)
    with small_filesystem(config.state_dir, "4m"):
        agent = run_agent(site, "cp-kill")
        try:
            wait_for_socket(config, agent)
            filler = fill_disk(config.state_dir)
            accepted = [request(config.control_socket, "test-alert")["seq"] for _ in range(5)]
        finally:
            stop(agent, signal.SIGKILL)  # no receiver yet: nothing was acknowledged
        assert agent.returncode == -signal.SIGKILL
        assert os.stat(config.outbox_path.with_name("outbox.sqlite.reserve")).st_blocks * 512 < 512 * 1024  # used
        filler.unlink()
        with Receiver(site.receiver_config, on_verdict=verdicts) as receiver:
            assert receiver.link.wait_connected(10)
            time.sleep(0.2)
            agent = run_agent(site, "cp-kill")
            try:
                assert wait_until(lambda: len(receiver.store.messages(kind="alert")) == 5, 30)
                assert wait_until(lambda: not _unacknowledged_alerts(config), 30)
            finally:
                err = stop(agent)
            assert sorted(m.seq for m in receiver.store.messages(kind="alert")) == accepted
    raised = [v.claims.seq for v in verdicts.accepted("alert")]
    assert sorted(raised) == accepted  # exactly once each
    assert "Traceback" not in err


def test_held_press_reaches_the_centre_even_if_the_agent_is_then_killed(site, receiver, verdicts):
    config = device_with_small_disk(site, "cp-nores", reserve_kb=0)  # no reserve: the first press is held
    with small_filesystem(config.state_dir, "4m"):
        agent = run_agent(site, "cp-nores")
        try:
            wait_for_socket(config, agent)
            filler = fill_disk(config.state_dir)
            with pytest.raises(ControlError, match="held in memory"):
                request(config.control_socket, "test-alert")
            assert wait_until(lambda: len(receiver.store.messages(kind="alert")) == 1, 15)
            status = request(config.control_socket, "status")
            assert status["indicator"] == "fault" and "held in memory" in status["storage_fault"]
        finally:
            stop(agent, signal.SIGKILL)
        (held,) = receiver.store.messages(kind="alert")
        filler.unlink()
        agent = run_agent(site, "cp-nores")
        try:
            wait_for_socket(config, agent)
            after = request(config.control_socket, "test-alert")["seq"]
            assert after > held.seq  # the held number was recorded: never reused (it would be a "replay")
            assert wait_until(lambda: len(receiver.store.messages(kind="alert")) == 2, 15)
        finally:
            stop(agent)
    assert not verdicts.with_outcome("rejected")
    assert sorted(v.claims.seq for v in verdicts.accepted("alert")) == [held.seq, after]


def _unacknowledged_alerts(config) -> list:
    with Outbox(config.outbox_path) as outbox:  # a second reader, as selftest would be
        return [e for e in outbox.entries() if e.kind == "alert"]


# One agent per state directory.


def test_second_agent_on_the_same_state_directory_stops_naming_the_first(site, receiver):
    config = site.add_device("cp-twice", body=BUTTONS)
    first = run_agent(site, "cp-twice")
    try:
        wait_for_socket(config, first)
        second = run_agent(site, "cp-twice")
        _, err = second.communicate(timeout=30)
        assert second.returncode == 1
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert lines == [
            f"error: state directory {config.state_dir} is in use by another edge-agent (PID {first.pid}); "
            "stop that one, or give this one its own [device] state_dir"
        ], err
        assert "Traceback" not in err
        assert request(config.control_socket, "status")["device"] == "cp-twice"  # the first one is untouched
    finally:
        stop(first, signal.SIGKILL)
    restarted = run_agent(site, "cp-twice")  # kill -9 leaves no stale lock behind
    try:
        wait_for_socket(config, restarted)
    finally:
        stop(restarted)


def test_two_agents_in_one_process_on_one_config_conflict(site, mock_factory):
    from agent.device.statelock import StateDirInUse

    config = site.add_device("cp-same", body=BUTTONS)
    with Agent(config, pin_factory=mock_factory):
        with pytest.raises(StateDirInUse, match=rf"\(PID {os.getpid()}\)"):
            Agent(config, pin_factory=mock_factory)
    with Agent(config, pin_factory=mock_factory):  # released on close
        pass


# The control socket.


def test_control_client_that_hangs_up_after_test_alert_leaves_no_traceback(site, receiver, mock_factory, capfd, caplog):
    config = site.add_device("cp-hangup", body=BUTTONS)
    with Agent(config, pin_factory=mock_factory) as agent:
        assert agent.link.wait_connected(10)
        with caplog.at_level("DEBUG", logger="agent.device.control"):
            for _ in range(3):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                    client.connect(str(config.control_socket))
                    client.sendall(json.dumps({"command": "test-alert"}).encode() + b"\n")
                    client.shutdown(socket.SHUT_RDWR)  # gone before the reply
            assert wait_until(lambda: len(receiver.store.messages(kind="alert", device="cp-hangup")) == 3, 15)
            assert wait_until(lambda: len([r for r in caplog.records if "went away" in r.getMessage()]) == 3, 5)
        gone = [r for r in caplog.records if "went away" in r.getMessage()]
        assert all(r.levelname in ("DEBUG", "INFO") and "'test-alert'" in r.getMessage() for r in gone)
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "BrokenPipe" not in err
