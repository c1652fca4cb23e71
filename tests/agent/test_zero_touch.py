"""Zero-touch enrolment on a real mosquitto and a real receiver: a card's enrolment file and one-time token."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
import tomllib
import uuid

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.centre.ca import DeviceCA, acl_text, listener_lines, verify_issued, write_broker_config
from agent.centre.enrolment_tokens import TokenBook, new_token, token_hash
from agent.centre.receiver import Receiver
from agent.cli import main
from agent.config.centre import load_receiver_config
from agent.config.device import load_agent_config
from agent.demo.broker import LocalBroker
from agent.demo.site import LocalSite
from agent.device.agent import Agent
from agent.errors import MosquittoMissing, SignatureInvalid
from agent.install.first_boot import first_boot
from agent.protocol.enrolment import enrolment_record
from agent.protocol.signing import (
    MessageSigner,
    generate_private_key,
    key_id,
    load_private_key,
    public_key_from_jwk,
    verify_claims,
)
from agent.protocol.zero_touch import parse_request, sign_request
from tests.conftest import wait_until


def press(pin):
    pin.drive_low()
    pin.drive_high()
    time.sleep(0.04)  # past the bounce lockout


def make_tokens(receiver, site, approve="auto", expires_in_s=3600.0, count=1, kind="call-point"):
    now = time.time()
    return TokenBook(receiver.store).create(site.site, kind, count, now + expires_in_s, approve, now)


def enrolment_file(tmp_path, site, token, device_id, name="edge-agent-enrol.toml"):
    """What an installer writes on the boot partition: no device secret, one token."""
    path = tmp_path / f"{device_id}-{name}"
    path.write_text(
        "# written by the installer\n"
        f'site = "{site.site}"\nkind = "call-point"\n'
        f'broker = "mqtt://{site.broker.host}:{site.broker.port}"\n'
        f'device_id = "{device_id}"\nlocation = "North gate"\n'
        f'token = "{token}"\n'
        f"centre_keys = '''{json.dumps(site.centre_keys)}'''\n"
    )
    return path


def boot(tmp_path, path, device_id, timeout_s=20.0):
    return first_boot(path, tmp_path / f"box-{device_id}", timeout_s=timeout_s, retry_s=0.5)


def test_a_box_enrols_from_its_file_and_its_first_press_is_acknowledged(tmp_path, site, receiver, mock_factory):
    (token,) = make_tokens(receiver, site)
    path = enrolment_file(tmp_path, site, token, "cp-zt-1")
    outcome = boot(tmp_path, path, "cp-zt-1")
    assert (outcome.outcome, outcome.device_id) == ("enrolled", "cp-zt-1")
    left = tomllib.loads(path.read_text())
    assert "token" not in left and left["site"] == site.site and left["location"] == "North gate"
    assert token not in path.read_text() and path.read_text().startswith("# written by the installer")
    (enrolled,) = [d for d in receiver.keyring.devices() if d.device_id == "cp-zt-1"]
    assert (enrolled.site, enrolled.kind, enrolled.location) == (site.site, "call-point", "North gate")
    assert receiver.counters["enrolment_enrolled"] == 1
    assert TokenBook(receiver.store).token(token_hash(token)).state == "used"
    config = load_agent_config(tmp_path / "box-cp-zt-1/etc/edge-agent/agent.toml")
    with Agent(config, pin_factory=mock_factory) as agent:
        assert agent.link.wait_connected(10)
        press(mock_factory.pin(17))
        assert wait_until(lambda: agent.delivery.stats.acknowledged >= 1, 15)
    (alert,) = receiver.store.messages(kind="alert")
    assert (alert.device, alert.claims["body"]["location"]) == ("cp-zt-1", "North gate")
    # A second boot finds no token: nothing to do (the systemd unit runs only while there is one).
    assert boot(tmp_path, path, "cp-zt-1").outcome == "nothing_to_do"


def test_used_expired_and_unknown_tokens_are_refused_with_the_reason(tmp_path, site, receiver):
    (token,) = make_tokens(receiver, site)
    assert boot(tmp_path, enrolment_file(tmp_path, site, token, "cp-a"), "cp-a").outcome == "enrolled"
    (expired,) = make_tokens(receiver, site, expires_in_s=-60)
    cases = {"cp-b": (token, "used"), "cp-c": (expired, "expired"), "cp-d": (new_token(), "unknown")}
    for device_id, (presented, reason) in cases.items():
        path = enrolment_file(tmp_path, site, presented, device_id)
        outcome = boot(tmp_path, path, device_id)
        assert (outcome.outcome, outcome.reason) == ("refused", reason), device_id
        assert tomllib.loads(path.read_text())["token"] == presented  # left for the installer to see
        state = json.loads((tmp_path / f"box-{device_id}/var/lib/edge-agent/enrolment.json").read_text())
        assert state["reason"] == reason
        assert receiver.counters[f"enrolment_{reason}"] == 1
        assert not [d for d in receiver.keyring.devices() if d.device_id == device_id]


def test_a_token_for_operator_approval_queues_the_box_until_approved(tmp_path, site, receiver, capsys):
    config = str(site.receiver_toml_path())
    assert main(["centre", "token", "create", "--config", config, "--site", site.site, "--kind", "call-point",
                 "--approve", "operator", "--expires-in", "1"]) == 0  # fmt: skip
    token = capsys.readouterr().out.strip()
    path = enrolment_file(tmp_path, site, token, "cp-op")
    done = {}
    worker = threading.Thread(target=lambda: done.update(outcome=boot(tmp_path, path, "cp-op")), daemon=True)
    worker.start()
    assert wait_until(lambda: receiver.counters["enrolment_pending"] >= 1, 15)
    assert not [d for d in receiver.keyring.devices() if d.device_id == "cp-op"]
    assert main(["centre", "enrolments", "list", "--config", config]) == 0
    (pending,) = json.loads(capsys.readouterr().out)
    assert (pending["device"], pending["state"]) == ("cp-op", "pending")
    assert main(["centre", "enrolments", "approve", str(pending["id"]), "--config", config]) == 0
    worker.join(20)
    assert done["outcome"].outcome == "enrolled"
    assert wait_until(lambda: [d.device_id for d in receiver.keyring.devices()] == ["cp-op"], 5)
    assert "token" not in tomllib.loads(path.read_text())
    assert main(["centre", "enrolments", "reject", str(pending["id"]), "--config", config]) != 0
    assert "is approved, not pending" in capsys.readouterr().err


def test_a_rejected_request_is_refused_with_the_reason(tmp_path, site, receiver):
    (token,) = make_tokens(receiver, site, approve="operator")
    path = enrolment_file(tmp_path, site, token, "cp-no")
    done = {}
    worker = threading.Thread(target=lambda: done.update(outcome=boot(tmp_path, path, "cp-no")), daemon=True)
    worker.start()
    book = TokenBook(receiver.store)
    assert wait_until(lambda: book.requests("pending"), 15)
    with contextlib.redirect_stdout(io.StringIO()):
        main(["centre", "enrolments", "reject", str(book.requests("pending")[0].id), "--config",
              str(site.receiver_toml_path()), "--reason", "not ours"])  # fmt: skip
    worker.join(20)
    assert (done["outcome"].outcome, done["outcome"].reason, done["outcome"].detail) == (
        "refused",
        "rejected",
        "not ours",
    )


def test_the_acl_lets_any_client_ask_to_enrol_only_under_its_own_client_id():
    acl = acl_text("edge", "centre-receiver")
    assert "pattern write edge/_enrol/%c/request" in acl and "pattern read edge/_enrol/%c/result" in acl
    receiver_part = acl.split("user centre-receiver")[1]
    assert "topic read edge/_enrol/+/request" in receiver_part and "topic write edge/_enrol/+/result" in receiver_part


# The request parser: whatever arrives is a request or a SignatureInvalid, never another exception.


@pytest.fixture(scope="module")
def device_key(tmp_path_factory):
    return generate_private_key(tmp_path_factory.mktemp("key") / "device-key.pem")


def test_a_valid_request_parses_and_a_foreign_signature_does_not(device_key, tmp_path):
    record = enrolment_record("cp-1", "site-a", "call-point", device_key)
    token, request_id = sign_request(MessageSigner(device_key), new_token(), record)
    parsed = parse_request(token.encode())
    assert (parsed.device.device_id, parsed.claims.request_id) == ("cp-1", request_id)
    other = generate_private_key(tmp_path / "other.pem")
    forged, _ = sign_request(MessageSigner(other), new_token(), record)  # someone else's key, this record
    with pytest.raises(SignatureInvalid, match="not signed with the key its record carries"):
        parse_request(forged.encode())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    token=st.text(max_size=40) | st.just(new_token()),
    record_changes=st.dictionaries(
        st.sampled_from(["device_id", "site", "kind", "jwk", "position", "location", "extra"]), json_values, max_size=3
    ),
    extra_claims=st.dictionaries(st.sampled_from(["csr", "v", "kind", "sent", "unknown"]), json_values, max_size=2),
)
def test_request_parser_accepts_or_refuses_with_a_reason(device_key, token, record_changes, extra_claims):
    record = {**enrolment_record("cp-1", "site-a", "call-point", device_key), **record_changes}
    claims = {"v": 1, "kind": "enrol-request", "request_id": str(uuid.uuid4()), "token": token, "record": record}
    claims |= {"sent": time.time(), **extra_claims}
    payload = MessageSigner(device_key).sign(claims).encode()
    try:
        parsed = parse_request(payload)
    except SignatureInvalid as exc:
        assert exc.reason in ("malformed", "oversized", "bad_signature")
        return
    assert parsed.claims.token == token and parsed.device.kid == record["kid"]


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_request_parser_never_raises_anything_else_on_arbitrary_bytes(payload):
    with pytest.raises(SignatureInvalid):
        parse_request(payload)


# Over TLS with the generated broker configuration: the shared bootstrap certificate, a CSR, the device CA.


@pytest.fixture
def tls_site(tmp_path):
    """mosquitto with 'centre broker-config' output (client certificates, ACL) and a receiver holding the device CA."""
    tmp_path.chmod(0o755)
    ca = DeviceCA(tmp_path / "ca")
    ca.init()
    out = tmp_path / "broker"
    write_broker_config(ca, out, hosts=("127.0.0.1",))
    try:
        broker = LocalBroker(
            workdir=tmp_path / "mosquitto",
            global_config=f"acl_file {out / 'acl'}",
            listener_config=listener_lines(out, ca.crl_path),
        )
        broker.start()
    except MosquittoMissing as exc:
        pytest.skip(str(exc))
    site = LocalSite(tmp_path / "site", broker, site="site-a")
    path = site.receiver_toml_path()
    text = path.read_text().replace("[receiver]\n", f'[receiver]\nca_dir = "{ca.directory}"\n', 1)
    tls = f'enabled = true\nca_file = "{out / "ca.pem"}"\ncert_file = "{out / "receiver.pem"}"\n'
    path.write_text(text.replace("enabled = false\n", tls + f'key_file = "{out / "receiver-key.pem"}"\n'))
    yield site, ca, out
    broker.close()


def paho_client(broker, out, client_id):
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.tls_set(
        ca_certs=str(out / "ca.pem"), certfile=str(out / "enrolment.pem"), keyfile=str(out / "enrolment-key.pem")
    )
    acks = {}
    client.on_publish = lambda c, u, mid, rc, p: acks.__setitem__(mid, rc)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client, acks


def test_over_tls_the_bootstrap_certificate_enrols_a_box_that_then_alerts_with_its_own(
    tmp_path, tls_site, mock_factory
):
    site, ca, out = tls_site
    with Receiver(load_receiver_config(site.receiver_toml_path())) as receiver:
        assert receiver.link.wait_subscribed(10)
        (token,) = make_tokens(receiver, site)
        path = tmp_path / "edge-agent-enrol.toml"
        path.write_text(
            f'site = "site-a"\nkind = "call-point"\nbroker = "mqtts://127.0.0.1:{site.broker.port}"\n'
            f'device_id = "cp-tls"\ntoken = "{token}"\ncsr = true\n'
            f"centre_keys = '''{json.dumps(site.centre_keys)}'''\nca_cert = '''{(out / 'ca.pem').read_text()}'''\n"
            f"enrol_cert = '''{(out / 'enrolment.pem').read_text()}'''\n"
            f"enrol_key = '''{(out / 'enrolment-key.pem').read_text()}'''\n"
        )
        outcome = first_boot(path, tmp_path / "box", timeout_s=20, retry_s=0.5)
        assert outcome.outcome == "enrolled", outcome
        cert = x509.load_pem_x509_certificate(
            (tmp_path / "box/etc/edge-agent/credentials/client-cert.pem").read_bytes()
        )
        verify_issued(ca, cert)
        assert cert.subject.rfc4514_string() == "CN=site-a/cp-tls"
        config = load_agent_config(tmp_path / "box/etc/edge-agent/agent.toml")
        with Agent(config, pin_factory=mock_factory) as agent:
            assert agent.link.wait_connected(10)
            press(mock_factory.pin(17))
            assert wait_until(lambda: agent.delivery.stats.acknowledged >= 1, 15)
        # The bootstrap identity on every card may ask to enrol under its own client id, and nothing else.
        client, acks = paho_client(site.broker, out, "enrol-x")
        try:
            own = client.publish("edge/_enrol/enrol-x/request", b"{}", qos=1).mid
            other = client.publish("edge/_enrol/enrol-y/request", b"{}", qos=1).mid
            alert = client.publish("edge/site-a/cp-tls/alert", b"forged", qos=1).mid
            assert wait_until(lambda: {own, other, alert} <= set(acks), 10)
            assert not acks[own].is_failure
            assert str(acks[other]) == str(acks[alert]) == "Not authorized"
        finally:
            client.disconnect()
            client.loop_stop()


# The desk's decisions, on the running receiver's own store, keyring and key (answers collected, not sent).


def ask(
    receiver,
    site,
    key,
    token,
    device_id="cp-9",
    site_name="demo-site",
    kind="call-point",
    client="enrol-cp-9",
    csr=None,
):
    """One request through the receiver's enrolment desk; returns (decision, the signed answer's claims)."""
    from agent.protocol.zero_touch import EnrolmentResultClaims, enrolment_topic

    sent = []
    request, _ = sign_request(MessageSigner(key), token, enrolment_record(device_id, site_name, kind, key), csr)
    topic = enrolment_topic("edge", client, "request")
    decision = receiver.enrolment.handle(topic, request.encode(), lambda t, p: sent.append((t, p)))
    if decision is None:
        return None, sent
    ((answer_topic, payload),) = sent
    assert answer_topic == enrolment_topic("edge", client, "result")
    centre_key = public_key_from_jwk(site.centre_jwk, "centre")
    return decision, verify_claims(EnrolmentResultClaims, payload, centre_key)


def test_the_same_key_asking_again_gets_the_same_answer_another_key_is_refused(tmp_path, receiver, site):
    (token,) = make_tokens(receiver, site)
    key, other = (generate_private_key(tmp_path / f"{n}.pem") for n in ("a", "b"))
    first, answer = ask(receiver, site, key, token)
    assert (first.outcome, answer.outcome, answer.device) == ("enrolled", "enrolled", "cp-9")
    again, answer = ask(receiver, site, key, token)  # the first answer was lost on the way: asked again
    assert (again.outcome, answer.outcome) == ("enrolled", "enrolled")
    refused, answer = ask(receiver, site, other, token, device_id="cp-10")
    assert (refused.reason, answer.reason) == ("used", "used")
    (fresh,) = make_tokens(receiver, site)
    taken, _ = ask(receiver, site, other, fresh)  # a second key for an enrolled device id: never a takeover
    assert taken.reason == "device_exists"
    assert [d.kid for d in receiver.keyring.devices()] == [key_id(key)]


def test_a_token_for_another_site_or_kind_is_refused_and_stays_unused(tmp_path, receiver, site):
    key = generate_private_key(tmp_path / "a.pem")
    (token,) = make_tokens(receiver, site, kind="camera-box")
    assert ask(receiver, site, key, token)[0].reason == "wrong_kind"
    assert ask(receiver, site, key, token, site_name="elsewhere")[0].reason == "wrong_site"
    assert TokenBook(receiver.store).token(token_hash(token)).state == "unused"
    assert ask(receiver, site, key, token, kind="camera-box")[0].outcome == "enrolled"


def test_a_malformed_request_over_the_broker_is_counted_and_never_answered(receiver, site):
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="enrol-junk", protocol=paho.MQTTv5)
    answers = []
    client.on_message = lambda c, u, m: answers.append(m.topic)
    client.connect(site.broker.host, site.broker.port)
    client.loop_start()
    try:
        client.subscribe("edge/_enrol/enrol-junk/result", qos=1)
        for payload in (b"not a jws", b"x" * 20000, b"eyJhbGciOiJub25lIn0.e30."):
            client.publish("edge/_enrol/enrol-junk/request", payload, qos=1)
        assert wait_until(lambda: receiver.counters["enrolment_malformed"] == 3, 10)
        assert receiver.problems() == []
    finally:
        client.disconnect()
        client.loop_stop()
    assert answers == []


def test_tokens_and_requests_on_postgresql(postgres, tmp_path):
    from agent.centre.store_postgres import PostgresStore
    from tests.centre.test_store_backends import fresh_database

    with PostgresStore(fresh_database(postgres)) as store:
        assert store.schema_version() == 4
        book = TokenBook(store)
        (token,) = book.create("s", "call-point", 1, time.time() + 60, "operator", time.time())
        key = generate_private_key(tmp_path / "k.pem")
        record = enrolment_record("cp-1", "s", "call-point", key)
        with store.transaction():
            book.add_request(token_hash(token), "enrol-cp-1", record, None, "pending", time.time())
            book.bind(token_hash(token), "pending", "cp-1", record["kid"], time.time())
        (pending,) = book.requests("pending")
        assert (pending.device, pending.record["kid"], book.token(token_hash(token)).state) == (
            "cp-1",
            record["kid"],
            "pending",
        )


def test_a_refused_box_enrols_with_the_same_key_once_the_installer_fixes_the_token(tmp_path, site, receiver):
    path = enrolment_file(tmp_path, site, new_token(), "cp-r")
    assert boot(tmp_path, path, "cp-r").reason == "unknown"
    credentials = tmp_path / "box-cp-r/etc/edge-agent/credentials"
    key_before = (credentials / "device-key.pem").read_bytes()
    (tmp_path / "box-cp-r/var/lib/edge-agent/enrolment-record.json").unlink()  # as if stopped before it was kept
    (token,) = make_tokens(receiver, site)
    path.write_text(
        "\n".join(f'token = "{token}"' if x.startswith("token") else x for x in path.read_text().split("\n"))
    )
    assert boot(tmp_path, path, "cp-r").outcome == "enrolled"
    assert (credentials / "device-key.pem").read_bytes() == key_before
    (enrolled,) = receiver.keyring.devices()
    assert (enrolled.device_id, enrolled.kid, enrolled.location) == (
        "cp-r",
        key_id(load_private_key(credentials / "device-key.pem")),
        "North gate",
    )


def test_the_command_exits_1_with_the_reason_on_refusal_and_0_when_there_is_nothing_to_do(
    tmp_path, site, receiver, capsys
):
    path = enrolment_file(tmp_path, site, new_token(), "cp-cli")
    root = str(tmp_path / "box-cli")
    args = ["enrol-first-boot", "--file", str(path), "--root", root, "--timeout", "20", "--retry", "0.5"]
    assert main(args) == 1
    assert "enrolment refused (unknown): no such enrolment token" in capsys.readouterr().err
    path.write_text("\n".join(x for x in path.read_text().split("\n") if not x.startswith("token")))
    assert main(args) == 0


def test_a_csr_without_a_device_ca_is_refused_and_the_token_stays_unused(tmp_path, site, receiver):
    from agent.install.provisioning import tls_key_and_csr

    (token,) = make_tokens(receiver, site)
    key = generate_private_key(tmp_path / "a.pem")
    csr = tls_key_and_csr(tmp_path / "tls-key.pem", site.site, "cp-9")
    decision, answer = ask(receiver, site, key, token, csr=csr)
    assert (decision.reason, answer.reason) == ("no_device_ca", "no_device_ca")
    assert TokenBook(receiver.store).token(token_hash(token)).state == "unused"
