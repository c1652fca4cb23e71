"""End to end on a real mosquitto: press → signed alert → verified and stored at the centre → ack on the LED."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from agent.centre.receiver import Receiver
from agent.device.agent import Agent
from agent.device.control import request
from agent.errors import ControlError
from agent.protocol.signing import MessageSigner, generate_private_key
from hw.gpio import IndicatorState
from tests.conftest import agent_run_argv, wait_until
from tests.led import wait_steady_on

BUTTONS = (
    '[[buttons]]\nname = "help"\npin = 17\nlocation = "North gate"\n\n'
    '[[buttons]]\nname = "duress"\npin = 27\nalert_kind = "duress"\nsilent = true\n\n'
    "[indicator]\nled_pin = 5\nack_display_s = 30\n"
)


def press(pin):
    pin.drive_low()
    pin.drive_high()
    time.sleep(0.04)  # deliberate: past the bounce lockout


def status_states(verdicts, device):
    """The device's accepted status messages ('online', and 'offline' from its last will), in order."""
    return [v.claims.body.get("state") for v in verdicts.accepted("status") if v.claims.device == device]


@pytest.fixture
def config(site):
    return site.add_device("cp-1", body=BUTTONS)


@pytest.fixture
def agent(config, mock_factory):
    with Agent(config, pin_factory=mock_factory) as running:
        assert running.link.wait_connected(10)
        yield running


def test_press_is_verified_stored_and_acknowledged_on_the_led(receiver, verdicts, agent, mock_factory):
    assert agent.indicator_state() is IndicatorState.IDLE
    press(mock_factory.pin(17))
    assert wait_until(lambda: agent.indicator_state() is IndicatorState.ACKNOWLEDGED, 10)
    (alert,) = receiver.store.messages(kind="alert")
    assert (alert.device, alert.site, alert.test) == ("cp-1", "demo-site", False)
    assert alert.claims["body"] == {
        "button": "help",
        "alert_kind": "assistance",
        "location": "North gate",
        "activation": "press",
        "silent": False,
    }
    assert wait_steady_on(mock_factory.pin(5))  # acknowledged: steady on, not a blink caught while lit
    assert agent.outbox.depth() == 0 or all(e.kind == "telemetry" for e in agent.outbox.entries())


def test_silent_button_changes_nothing_at_the_device(receiver, agent, mock_factory):
    press(mock_factory.pin(27))
    assert wait_until(lambda: receiver.store.messages(kind="alert"), 10)
    assert wait_until(lambda: agent.delivery.stats.acknowledged >= 1, 10)
    assert agent.indicator_state() is IndicatorState.IDLE


def test_alert_is_pending_until_the_centre_acknowledges(site, agent, mock_factory, verdicts):
    press(mock_factory.pin(17))  # no receiver running yet: the broker takes it, nobody acknowledges
    assert wait_until(lambda: agent.delivery.stats.published >= 1, 10)
    assert agent.indicator_state() is IndicatorState.PENDING
    with Receiver(site.receiver_config, on_verdict=verdicts) as receiver:  # the centre comes up
        assert wait_until(lambda: agent.indicator_state() is IndicatorState.ACKNOWLEDGED, 20)
        assert len(receiver.store.messages(kind="alert")) == 1


def test_fifty_presses_while_the_broker_is_down_arrive_in_order_once(broker, receiver, agent, mock_factory):
    broker.stop()
    assert wait_until(lambda: not agent.link.is_connected, 10)
    assert agent.indicator_state() is IndicatorState.FAULT
    for _ in range(50):
        press(mock_factory.pin(17))
    assert [e.kind for e in agent.outbox.entries()].count("alert") == 50
    broker.start()
    assert wait_until(lambda: len(receiver.store.messages(kind="alert")) == 50, 60)
    assert wait_until(lambda: not [e for e in agent.outbox.entries() if e.kind == "alert"], 30)
    stored = receiver.store.messages(kind="alert")
    seqs = [m.seq for m in stored]
    assert seqs == sorted(seqs) and len(set(seqs)) == 50
    assert agent.indicator_state() is IndicatorState.ACKNOWLEDGED


def test_kill_9_right_after_presses_loses_nothing_and_raises_nothing_twice(site, receiver, verdicts, config):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from gpiozero.pins.mock import MockFactory
        from agent.config.device import load_agent_config
        from agent.device.agent import Agent
        factory = MockFactory()
        agent = Agent(load_agent_config({str(site.device_config_path("cp-1"))!r}), pin_factory=factory)
        agent.start()
        agent.link.wait_connected(10)
        for _ in range(20):
            factory.pin(17).drive_low(); factory.pin(17).drive_high(); time.sleep(0.035)  # past the lockout
        print("pressed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert wait_until(lambda: status_states(verdicts, "cp-1")[-1:] == ["offline"], 10)  # the broker saw it die
    from gpiozero.pins.mock import MockFactory

    with Agent(config, pin_factory=MockFactory()) as restarted:
        assert wait_until(lambda: len(receiver.store.messages(kind="alert")) == 20, 30)
        assert wait_until(lambda: not [e for e in restarted.outbox.entries() if e.kind == "alert"], 30)
    raised = [v.claims.seq for v in verdicts.accepted("alert")]
    assert len(raised) == 20 and len(set(raised)) == 20


def test_forged_ack_is_ignored_and_the_alert_stays_pending(site, agent, mock_factory, tmp_path):
    press(mock_factory.pin(17))
    assert wait_until(lambda: agent.delivery.stats.published >= 1, 10)
    (entry,) = [e for e in agent.outbox.entries() if e.kind == "alert"]
    impostor = MessageSigner(generate_private_key(tmp_path / "impostor.pem"))
    forged = {
        "v": 1,
        "kind": "ack",
        "receiver": "evil",
        "device": "cp-1",
        "seq": entry.seq,
        "event_id": entry.event_id,
        "stored_at": time.time(),
        "sent": time.time(),
        "duplicate": False,
    }
    agent.delivery.handle_ack(impostor.sign(forged).encode())
    assert wait_until(lambda: agent.delivery.stats.bad_acks.get("bad_signature") == 1, 5)
    assert agent.indicator_state() is IndicatorState.PENDING
    assert [e.seq for e in agent.outbox.entries() if e.kind == "alert"] == [entry.seq]


def test_control_socket_status_test_alert_and_unknown_command(receiver, agent, config):
    path = config.control_socket
    assert oct(path.stat().st_mode & 0o777) == "0o660"
    status = request(path, "status")
    assert status["device"] == "cp-1" and status["connected"] is True
    reply = request(path, "test-alert", button="help")
    assert wait_until(lambda: receiver.store.messages(kind="alert"), 10)
    (alert,) = receiver.store.messages(kind="alert")
    assert alert.test is True and alert.seq == reply["seq"]
    with pytest.raises(ControlError, match="unknown command 'reboot'; known commands: status, test-alert"):
        request(path, "reboot")
    with pytest.raises(ControlError, match="no button named 'nope'; configured buttons: help, duress"):
        request(path, "test-alert", button="nope")


def test_cli_status_and_test_alert(receiver, agent, config, site, capsys):
    from agent.cli import main

    assert main(["test-alert", "--config", str(site.device_config_path("cp-1")), "--button", "help"]) == 0
    assert "test alert seq" in capsys.readouterr().out
    assert main(["status", "--config", str(site.device_config_path("cp-1"))]) == 0
    assert '"device": "cp-1"' in capsys.readouterr().out


def test_retained_status_is_online_and_the_will_says_offline(site, receiver, verdicts, config):
    device = subprocess.Popen(
        agent_run_argv(site.device_config_path("cp-1")),
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: "online" in status_states(verdicts, "cp-1"), 20)
    finally:
        device.kill()  # the device vanishes without a DISCONNECT: the broker publishes its last will
        device.wait()
    assert wait_until(lambda: status_states(verdicts, "cp-1")[-1:] == ["offline"], 10)


def test_press_is_held_not_lost_when_the_outbox_cannot_store_it(receiver, agent, mock_factory):
    db = agent.outbox._db  # fault injection inside SQLite itself: every insert into the outbox now fails
    with agent.outbox._lock:
        db.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON outbox BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    press(mock_factory.pin(17))
    press(mock_factory.pin(17))
    assert agent.indicator_state() is IndicatorState.FAULT  # never "pending" for a press that is not stored
    assert len(agent._unstored) == 2
    with agent.outbox._lock:
        db.execute("DROP TRIGGER refuse")  # the storage works again
    assert wait_until(lambda: len(receiver.store.messages(kind="alert")) == 2, 15)
    first, second = receiver.store.messages(kind="alert")
    assert first.seq < second.seq and first.claims["created"] < second.claims["created"]
    assert wait_until(lambda: agent.indicator_state() is IndicatorState.ACKNOWLEDGED, 10)


def test_control_socket_refuses_malformed_requests(agent, config):
    import socket as sockets

    for raw, error in (
        (b"reboot now\n", "request is not a JSON object on one line"),
        (b'{"cmd": "status"}\n', "request needs a string field 'command'"),
    ):
        with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as sock:
            sock.connect(str(config.control_socket))
            sock.sendall(raw)
            reply = json.loads(sock.makefile("rb").readline())
        assert reply == {"ok": False, "error": error}


def test_opening_the_enclosure_reaches_the_centre_as_a_signed_tamper_event(site, receiver, mock_factory):
    config = site.add_device("cp-lid", body=BUTTONS + "\n[tamper]\npin = 22\n")
    with Agent(config, pin_factory=mock_factory) as agent:
        mock_factory.pin(22).drive_low()  # the lid is shut
        time.sleep(0.1)  # deliberate: past the switch's 50 ms debounce
        mock_factory.pin(22).drive_high()  # someone opens it
        assert wait_until(
            lambda: (
                [m.claims["body"] for m in receiver.store.messages(kind="tamper") if m.device == "cp-lid"][-1:]
                == [{"enclosure": "opened"}]
            ),
            10,
        )
        assert agent.health()["tamper"] == "open"
        assert wait_until(lambda: not [e for e in agent.outbox.entries() if e.kind == "tamper"], 10)  # acknowledged
