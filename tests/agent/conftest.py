"""Fixtures the agent tests share: a device key with a checker that trusts it, a broker that requires TLS."""

import pytest

from agent.centre.keyring import Keyring
from agent.centre.receiver import MessageChecker
from agent.centre.store import ReceiverStore
from agent.demo.broker import LocalBroker
from agent.errors import MosquittoMissing
from agent.protocol.enrolment import enrolment_record
from agent.protocol.messages import TopicLayout
from agent.protocol.signing import generate_private_key


@pytest.fixture
def device_key(tmp_path):
    return generate_private_key(tmp_path / "device.pem")


@pytest.fixture
def checker(tmp_path, device_key):
    """The centre's checks, with cp-1 of site-a enrolled under ``device_key``."""
    keyring = Keyring(tmp_path / "keyring")
    keyring.enroll(enrolment_record("cp-1", "site-a", "call-point", device_key))
    with ReceiverStore(tmp_path / "r.sqlite") as store:
        yield MessageChecker(keyring, store, TopicLayout("edge"))


@pytest.fixture
def tls_broker(tmp_path, pki):
    """mosquitto with TLS and client certificates from the test module's ``pki``."""
    config = (
        f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server-key.pem'}\n"
        "require_certificate true\n"
    )
    try:
        with LocalBroker(workdir=tmp_path / "mosquitto", listener_config=config) as running:
            yield running
    except MosquittoMissing as exc:
        pytest.skip(str(exc))
