"""End to end: a device's alerts, verified and stored by the receiver, reach an ARC (pysiaalarm) as Contact ID."""

from __future__ import annotations

import json
import urllib.request

import pytest

from agent.centre.receiver import Receiver
from agent.config.centre import load_receiver_config
from agent.device.agent import Agent
from tests.centre.test_dc09_forwarder import AES128, SiaArc
from tests.conftest import wait_until

BUTTONS = (
    '[[buttons]]\nname = "help"\npin = 17\n\n'
    '[[buttons]]\nname = "duress"\npin = 27\nalert_kind = "duress"\nsilent = true\n\n'
    "[indicator]\nled_pin = 5\n"
)


@pytest.fixture
def arc():
    running = SiaArc([("A100", AES128)]).start()
    yield running
    running.stop()


@pytest.fixture
def forwarding_receiver(site, arc, verdicts):
    credentials = site.receiver_config.secret_dirs[0]
    (credentials / "arc.key").write_text(AES128.encode().hex())
    path = site.receiver_toml_path()
    text = path.read_text().replace("[receiver]\n", '[receiver]\nmetrics_listen = "127.0.0.1:0"\n', 1)
    path.write_text(
        text + "\n[[forward.arc]]\n"
        f'name = "arc-1"\nprimary = "{arc.address}"\nkey_file = "arc.key"\nack_timeout_s = 2\n'
        f'[[forward.arc.accounts]]\nsite = "{site.site}"\ndevice = "cp-1"\naccount = "A100"\nzone = 7\n'
    )
    with Receiver(load_receiver_config(path), on_verdict=verdicts) as running:
        assert running.link.wait_subscribed(10)
        yield running


def test_alerts_tamper_and_tests_reach_the_arc_with_their_contact_id_codes(
    site, arc, forwarding_receiver, mock_factory
):
    config = site.add_device("cp-1", body=BUTTONS)
    with Agent(config, pin_factory=mock_factory) as agent:
        assert agent.link.wait_connected(10)
        agent.raise_alert("help")
        agent.raise_alert("duress")
        agent.raise_alert("help", test=True)  # a test alert: always the test code, never an alarm
        agent.raise_event("tamper", {"enclosure": "opened"})
        agent.raise_event("tamper", {"enclosure": "closed"})
        assert wait_until(lambda: len(arc.got()) == 5, 15)
    events = arc.got()
    assert [(e.event_qualifier, e.event_type, e.code) for e in events] == [
        ("1", "120", "PA"),
        ("1", "121", "HA"),
        ("1", "601", "RX"),
        ("1", "137", "TA"),
        ("3", "137", "TR"),
    ]
    assert {(e.account, e.ri, e.partition) for e in events} == {("A100", "007", "01")}
    assert wait_until(lambda: forwarding_receiver.forwarding.queue.status()[0].depth == 0, 5)
    host, port = forwarding_receiver.metrics.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert 'edge_agent_arc_queue_depth{arc="arc-1"} 0.0' in metrics
    assert 'edge_agent_arc_connected{arc="arc-1",path="primary"} 1.0' in metrics
    assert 'edge_agent_arc_fault{arc="arc-1"} 0.0' in metrics
    assert 'edge_agent_arc_answers_total{arc="arc-1",kind="ACK"} 5.0' in metrics


def test_device_missing_waits_for_the_arc_and_receiver_forwarders_shows_it(site, arc, forwarding_receiver, capsys):
    from agent.centre.registry import DeviceEvent
    from agent.cli import main

    arc.stop()  # the ARC is gone: the event waits in the queue, and the command says so
    forwarding = forwarding_receiver.forwarding
    with forwarding_receiver.store.transaction():
        forwarding.enqueue_device_events([DeviceEvent("cp-1", site.site, "missing", "silent for 95 s")])
    assert wait_until(lambda: (forwarding.queue.status()[0].fault or "").startswith("cannot reach"), 10)
    assert main(["receiver", "forwarders", "--config", str(site.receiver_toml_path()), "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert (shown["arc"], shown["connected"], shown["queue"]) == ("arc-1", "not connected", 1)
    assert shown["fault"].startswith("cannot reach the ARC: primary 127.0.0.1:")
    back = SiaArc(arc.accounts, port=arc.port).start()  # the ARC returns on its address
    try:
        assert wait_until(lambda: len(back.got()) == 1, 15)
        (event,) = back.got()
        assert (event.event_qualifier, event.event_type, event.code, event.ri) == ("1", "350", "YC", "007")
        assert wait_until(lambda: forwarding.queue.status()[0].fault is None, 5)
    finally:
        back.stop()
