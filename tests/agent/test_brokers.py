"""A device with two brokers: it fails over when its broker dies mid-burst, and comes back to the first."""

import time

import pytest

from agent.centre.receiver import Receiver
from agent.config.centre import load_receiver_config
from agent.config.device import load_agent_config
from agent.demo.broker import LocalBroker
from agent.device.agent import Agent
from agent.errors import MosquittoMissing
from tests.conftest import wait_until


@pytest.fixture
def second_broker(tmp_path):
    try:
        with LocalBroker(workdir=tmp_path / "mosquitto-2") as running:
            yield running
    except MosquittoMissing as exc:
        pytest.skip(str(exc))


def with_fallback(site, device: str, fallback: LocalBroker):
    """The device's config with the second broker after the first, tried again every second."""
    path = site.device_config_path(device)
    text = path.read_text().replace(
        "reconnect_max_s = 1.0\n",
        f'reconnect_max_s = 1.0\nfallback = ["{fallback.host}:{fallback.port}"]\nprimary_check_s = 1\n',
        1,
    )
    path.write_text(text)
    return load_agent_config(path)


def receiver_on_both(site, second: LocalBroker):
    """The centre's receiver, connected to every broker (the [mqtt] fallback list names the second)."""
    path = site.receiver_toml_path()
    text = path.read_text().replace(
        "reconnect_max_s = 1.0\n", f'reconnect_max_s = 1.0\nfallback = ["{second.host}:{second.port}"]\n', 1
    )
    path.write_text(text)
    return load_receiver_config(path)


def test_a_device_fails_over_mid_burst_and_returns_to_its_first_broker(site, broker, second_broker, mock_factory):
    site.add_device("cp-2b")
    config = with_fallback(site, "cp-2b", second_broker)
    with (
        Receiver(receiver_on_both(site, second_broker)) as receiver,
        Agent(config, pin_factory=mock_factory) as agent,
    ):
        assert all(link.wait_subscribed(10) for link in receiver.links) and len(receiver.links) == 2
        assert agent.link.wait_connected(10) and agent.link.broker == (broker.host, broker.port)
        accepted = [agent.raise_alert("main") for _ in range(10)]
        broker.stop()  # the first broker dies mid-burst
        accepted += [agent.raise_alert("main") for _ in range(10)]
        assert wait_until(lambda: agent.link.broker == (second_broker.host, second_broker.port), 15)
        assert wait_until(lambda: agent.delivery.stats.acknowledged >= 20, 20)
        broker.start()  # back: the device returns to it
        assert wait_until(lambda: agent.link.broker == (broker.host, broker.port) and agent.link.is_connected, 20)
        accepted += [agent.raise_alert("main") for _ in range(5)]
        assert wait_until(lambda: agent.delivery.stats.acknowledged >= 25, 20)
        time.sleep(0.5)  # deliberate: late duplicates would show up here
        stored = receiver.store.messages(kind="alert")
        assert receiver.problems() == []
    assert sorted(m.event_id for m in stored) == sorted(e.event_id for e in accepted)  # each once, none lost


@pytest.mark.parametrize("announced, warned", [(None, False), (20, True)])
def test_a_receiver_warns_of_a_broker_that_takes_fewer_acks_in_flight_than_it_sends(
    tmp_path, site, caplog, announced, warned
):
    """paho ignores the broker's Receive Maximum (MQTT 5 §4.9), and a receiver sends one ack per message it takes."""
    limit = "" if announced is None else f"max_inflight_messages {announced}"
    with LocalBroker(workdir=tmp_path / "broker", global_config=limit) as broker:
        config = load_receiver_config(site.receiver_toml_path())
        config = config.model_copy(update={"mqtt": config.mqtt.model_copy(update={"port": broker.port})})
        with caplog.at_level("WARNING", logger="agent.mqtt.link"), Receiver(config) as receiver:
            assert receiver.link.wait_connected(10)
    warnings = [r.getMessage() for r in caplog.records if "Receive Maximum" in r.getMessage()]
    assert bool(warnings) == warned
    if warned:
        assert "at most 20 unacknowledged" in warnings[0] and "max_inflight_messages 0" in warnings[0]
