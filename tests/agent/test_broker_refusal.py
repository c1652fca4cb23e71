"""A broker that refuses a publish (ACL) is not a delivery: the alert stays in the outbox until it is accepted."""

import time

import pytest

from agent.centre.receiver import Receiver
from agent.demo.broker import LocalBroker
from agent.demo.site import LocalSite
from agent.device.agent import Agent
from agent.errors import MosquittoMissing
from tests.conftest import wait_until


def test_alert_refused_by_the_broker_acl_is_kept_and_sent_once_allowed(tmp_path, mock_factory):
    acl = tmp_path / "acl"
    acl.write_text(
        "pattern read #\npattern write edge/+/+/status\npattern write edge/+/+/telemetry\npattern write edge/+/+/ack\n"
    )  # alerts may not be written yet
    acl.chmod(0o644)
    try:
        broker = LocalBroker(workdir=tmp_path / "m", listener_config=f"acl_file {acl}\n")
    except MosquittoMissing as exc:
        pytest.skip(str(exc))
    with broker:
        site = LocalSite(tmp_path / "site", broker)
        config = site.add_device("cp-acl")
        with Receiver(site.receiver_config) as receiver, Agent(config, pin_factory=mock_factory) as agent:
            assert agent.link.wait_connected(10)
            assert receiver.link.wait_subscribed(10)  # else "nothing reached the centre" would prove nothing
            mock_factory.pin(17).drive_low()
            mock_factory.pin(17).drive_high()
            assert wait_until(lambda: agent.delivery.stats.refused_by_broker >= 1, 10)
            time.sleep(0.5)  # deliberate: time for a wrongly retired or delivered alert to show
            (entry,) = [e for e in agent.outbox.entries() if e.kind == "alert"]
            assert entry.published_at is None and receiver.store.messages(kind="alert") == []
            acl.write_text("pattern readwrite #\n")
            broker.stop()
            broker.start()  # the operator fixes the ACL
            assert wait_until(lambda: len(receiver.store.messages(kind="alert")) == 1, 30)
            assert wait_until(lambda: not [e for e in agent.outbox.entries() if e.kind == "alert"], 15)
