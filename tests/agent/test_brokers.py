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


def receiver_on(site, broker: LocalBroker, receiver_id: str):
    """A receiver on one broker, storing in the same database as the site's other receiver."""
    path = site.receiver_toml_path()
    other = path.with_name(f"{receiver_id}.toml")
    text = path.read_text().replace('id = "centre-1"', f'id = "{receiver_id}"')
    other.write_text(text.replace(f"port = {site.broker.port}", f"port = {broker.port}"))
    return load_receiver_config(other)


def test_a_device_fails_over_mid_burst_and_returns_to_its_first_broker(site, broker, second_broker, mock_factory):
    site.add_device("cp-2b")
    config = with_fallback(site, "cp-2b", second_broker)
    with (
        Receiver(site.receiver_config) as first_receiver,
        Receiver(receiver_on(site, second_broker, "centre-2")) as second_receiver,
        Agent(config, pin_factory=mock_factory) as agent,
    ):
        assert first_receiver.link.wait_subscribed(10) and second_receiver.link.wait_subscribed(10)
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
        stored = first_receiver.store.messages(kind="alert")
    assert sorted(m.event_id for m in stored) == sorted(e.event_id for e in accepted)  # each once, none lost
