"""The per-message cost does not grow with the fleet: key lookups use an index, stored messages share commits."""

import sqlite3
import time

import pytest
from joserfc.jwk import OKPKey

from agent.centre.keyring import Keyring
from agent.device.agent import Agent
from agent.mqtt.link import Inbound
from agent.protocol.enrolment import enrolment_record
from agent.protocol.messages import new_claims
from agent.protocol.signing import MessageSigner
from tests.conftest import wait_until


def enrol(keyring: Keyring, count: int, site: str = "site-a") -> list[OKPKey]:
    keys = [OKPKey.generate_key("Ed25519") for _ in range(count)]
    for n, key in enumerate(keys):
        keyring.enroll(enrolment_record(f"dev-{n}", site, "call-point", key))
    return keys


@pytest.mark.parametrize("fleet", [10, 5000])
def test_lookups_do_not_list_the_directory(tmp_path, fleet):
    keyring = Keyring(tmp_path / "keyring")
    keys = enrol(keyring, fleet)
    kids = [key.thumbprint() for key in keys[:10]]
    assert keyring.lookup(kids[0]).device_id == "dev-0"  # the first lookup lists the directory
    listed = keyring.reloads
    for n in range(10_000):
        found = keyring.lookup(kids[n % 10])
        assert found is not None and found.kid == kids[n % 10]
    assert keyring.lookup("not-enrolled") is None
    assert keyring.reloads - listed <= 1  # at most once more, for a change in the directory's last clock tick
    assert len(keyring) == fleet


def test_deleting_an_enrolment_file_revokes_the_device(tmp_path):
    keyring = Keyring(tmp_path / "keyring")
    keys = enrol(keyring, 3)
    kid = keys[1].thumbprint()
    assert keyring.lookup(kid).device_id == "dev-1"
    (tmp_path / "keyring" / "dev-1.json").unlink()
    assert wait_until(lambda: keyring.lookup(kid) is None, 5)
    assert [d.device_id for d in keyring.devices()] == ["dev-0", "dev-2"]
    assert keyring.lookup(keys[0].thumbprint()).device_id == "dev-0"


def test_enrolment_by_another_process_is_noticed_and_replaces_the_old_key(tmp_path):
    """`edge-agent receiver enroll` writes with its own Keyring; the receiver's sees it without a restart."""
    receiver_side = Keyring(tmp_path / "keyring")
    enrol(receiver_side, 2)
    assert len(receiver_side) == 2
    cli_side = Keyring(tmp_path / "keyring")
    old_kid = receiver_side.devices()[0].kid
    new_key = OKPKey.generate_key("Ed25519")
    cli_side.enroll(enrolment_record("dev-0", "site-a", "call-point", new_key))
    assert wait_until(lambda: receiver_side.lookup(new_key.thumbprint()) is not None, 5)
    assert receiver_side.lookup(old_kid) is None  # the key id is the thumbprint: the old key is gone
    assert len(receiver_side) == 2


def test_invalid_enrolment_files_are_skipped(tmp_path):
    keyring = Keyring(tmp_path / "keyring")
    (key,) = enrol(keyring, 1)
    (tmp_path / "keyring" / "broken.json").write_text("{not json")
    (tmp_path / "keyring" / "empty.json").write_text("{}")
    assert [d.device_id for d in keyring.devices()] == ["dev-0"]
    assert keyring.lookup(key.thumbprint()).device_id == "dev-0"


def alert_inbound(key: OKPKey, device: str, seq: int, site: str, prefix: str = "edge", claims=None) -> Inbound:
    claims = claims or new_claims(device=device, site=site, seq=seq, kind="alert", body={"button": "b"})
    payload = MessageSigner(key).sign({**claims, "sent": time.time()}).encode()
    return Inbound(f"{prefix}/{site}/{device}/alert", payload, mid=0, qos=0, received_at=time.time())


def test_a_batch_judges_duplicates_and_replays_as_one_by_one(site, receiver, verdicts):
    key = OKPKey.generate_key("Ed25519")
    site.keyring.enroll(enrolment_record("cp-b", site.site, "call-point", key))
    assert wait_until(lambda: receiver.keyring.lookup(key.thumbprint()) is not None, 5)
    first = new_claims(device="cp-b", site=site.site, seq=1, kind="alert", body={"button": "b"})
    batch = [
        alert_inbound(key, "cp-b", 1, site.site, claims=first),
        alert_inbound(key, "cp-b", 1, site.site, claims=first),  # the same event again: a redelivery
        alert_inbound(key, "cp-b", 1, site.site),  # another event on the same sequence: a replay
        alert_inbound(key, "cp-b", 2, site.site),
    ]
    receiver._handle_batch([(inbound, time.time()) for inbound in batch])
    assert [(v.outcome, v.reason) for v in verdicts.verdicts] == [
        ("accepted", None),
        ("duplicate", None),
        ("rejected", "replayed"),
        ("accepted", None),
    ]
    stored = receiver.store.messages(device="cp-b")
    assert [(m.seq, m.event_id) for m in stored] == [(1, str(first["event_id"])), (2, stored[1].event_id)]
    assert {s.device: s.status for s in receiver.registry.states()}["cp-b"] == "online"


def test_a_failed_batch_commit_costs_only_the_failing_message(site, receiver, verdicts):
    """A real SQLite trigger refuses seq 2: the batch is rolled back and stored one by one instead."""
    key = OKPKey.generate_key("Ed25519")
    site.keyring.enroll(enrolment_record("cp-f", site.site, "call-point", key))
    assert wait_until(lambda: receiver.keyring.lookup(key.thumbprint()) is not None, 5)
    with sqlite3.connect(receiver.store.path) as db:
        db.execute(
            "CREATE TRIGGER refuse_seq_2 BEFORE INSERT ON messages WHEN NEW.seq = 2"
            " BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )
    batch = [alert_inbound(key, "cp-f", seq, site.site) for seq in (1, 2, 3)]
    receiver._handle_batch([(inbound, time.time()) for inbound in batch])
    assert [(v.outcome, v.reason) for v in verdicts.verdicts] == [
        ("accepted", None),
        ("rejected", "store_failed"),
        ("accepted", None),
    ]
    assert [m.seq for m in receiver.store.messages(device="cp-f")] == [1, 3]
    assert receiver.counters["store_failed"] == 1


def test_a_burst_of_alerts_is_stored_once_each_and_acknowledged(site, receiver, verdicts, mock_factory):
    with Agent(site.add_device("cp-burst"), pin_factory=mock_factory) as agent:
        entries = [agent.raise_alert("main") for _ in range(80)]
        assert wait_until(lambda: agent.delivery.stats.acknowledged == 80, 60)
    stored = receiver.store.messages(kind="alert", device="cp-burst")
    assert sorted(m.event_id for m in stored) == sorted(e.event_id for e in entries)
    assert len(verdicts.accepted("alert")) == 80
    assert receiver.counters["replayed"] == receiver.counters["store_failed"] == 0
