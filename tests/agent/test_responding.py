"""'Help is coming' end to end on a real mosquitto: press → ack → the centre's Responder → the device's LED and buzzer."""

import queue
import time
import uuid

import pytest
from joserfc.jwk import OKPKey

from agent.centre.responder import Responder, may_reveal
from agent.centre.store import StoredMessage
from agent.device.agent import Agent
from agent.device.response import names_responding
from agent.mqtt.link import MqttLink
from agent.protocol.messages import RESPONDING_MAX_AGE_S, RespondingClaims, TopicLayout
from agent.protocol.signing import MessageSigner, generate_private_key, verify_claims
from hw.gpio import IndicatorState
from tests.conftest import wait_until
from tests.led import LedWatch, assert_blinks, complete_cycles, wait_blinks, wait_steady_on

BUTTONS = (
    '[[buttons]]\nname = "help"\npin = 17\nlocation = "North gate"\n\n'
    '[[buttons]]\nname = "duress"\npin = 27\nalert_kind = "duress"\nsilent = true\n\n'
    "[indicator]\nled_pin = 5\nbuzzer_pin = 6\nack_display_s = 30\nhelp_display_s = 600\n"
)
LED, BUZZER = 5, 6
CENTRE_KEY = OKPKey.generate_key("Ed25519")


def press(pin):
    pin.drive_low()
    pin.drive_high()
    time.sleep(0.04)  # deliberate: past the bounce lockout


@pytest.fixture
def agent(site, mock_factory):
    with Agent(site.add_device("cp-1", body=BUTTONS), pin_factory=mock_factory) as running:
        assert running.link.wait_connected(10)
        yield running


@pytest.fixture
def responder(receiver):
    return Responder(receiver.signer, receiver.topics, lambda t, p: receiver.link.publish(t, p, qos=1), "centre-1")


@pytest.fixture
def ack_topic(site, broker):
    """Everything published on cp-1's ack topic, seen by a separate subscriber."""
    seen: queue.Queue[bytes] = queue.Queue()
    link = MqttLink(site.receiver_config.mqtt, client_id="ack-watcher", secret_dirs=())
    link.on_message = lambda topic, payload: seen.put(payload)
    link.subscribe("edge/demo-site/cp-1/ack")
    link.start()
    assert link.wait_subscribed(10)
    yield seen
    link.close()


def responding_seen(seen: queue.Queue, timeout: float = 10.0) -> list[bytes]:
    """The 'responding' messages among what arrived, waiting until at least one is there."""
    found: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not found and time.monotonic() < deadline:
        try:
            payload = seen.get(timeout=0.1)
        except queue.Empty:
            continue
        if names_responding(payload):
            found.append(payload)
    while not seen.empty():
        payload = seen.get()
        if names_responding(payload):
            found.append(payload)
    return found


def stored_alert(receiver, button: str):
    assert wait_until(
        lambda: [m for m in receiver.store.messages(kind="alert") if m.claims["body"]["button"] == button]
    )
    return next(m for m in receiver.store.messages(kind="alert") if m.claims["body"]["button"] == button)


def press_until_acknowledged(agent, receiver, mock_factory, pin=17, button="help"):
    press(mock_factory.pin(pin))
    assert wait_until(lambda: agent.indicator_state() is IndicatorState.ACKNOWLEDGED, 10)
    return stored_alert(receiver, button)


def send(receiver, claims: dict, signer: MessageSigner | None = None) -> bytes:
    """A 'responding' message published by the centre's own connection (signed by ``signer``, the centre's by default)."""
    token = (signer or receiver.signer).sign(claims).encode()
    receiver.link.publish("edge/demo-site/cp-1/ack", token, qos=1)
    return token


def claims_for(alert, **changes) -> dict:
    claims = {
        "v": 1,
        "kind": "responding",
        "centre": "centre-1",
        "device": alert.device,
        "seq": alert.seq,
        "event_id": alert.event_id,
        "id": str(uuid.uuid4()),
        "sent": time.time(),
    }
    return {**claims, **changes}


def test_take_charge_shows_help_is_coming_on_led_and_buzzer(receiver, agent, responder, mock_factory):
    alert = press_until_acknowledged(agent, receiver, mock_factory)
    assert wait_steady_on(mock_factory.pin(LED))  # acknowledged, and its three beeps are over
    buzzer = LedWatch(mock_factory.pin(BUZZER))
    assert responder.help_is_coming(alert) is True
    assert wait_until(lambda: agent.indicator_state() is IndicatorState.HELP_COMING, 10)
    assert wait_until(lambda: agent.indicator.state is IndicatorState.HELP_COMING, 2)
    wait_blinks(mock_factory.pin(LED), 0.75, 0.25, cycles=2)  # long on, short off
    assert wait_until(lambda: complete_cycles(buzzer.intervals()) >= 1, 5)
    assert_blinks(buzzer.intervals(), 0.5, 0.25, cycles=1)  # long beeps, not the ack's short ones
    assert agent.help_coming.report() == {"showing": True, "shown": 1, "refused": {}}


def test_the_next_press_ends_help_is_coming(receiver, agent, responder, mock_factory):
    alert = press_until_acknowledged(agent, receiver, mock_factory)
    responder.help_is_coming(alert)
    assert wait_until(lambda: agent.indicator_state() is IndicatorState.HELP_COMING, 10)
    press(mock_factory.pin(27))  # a silent press changes nothing the person could see
    assert agent.indicator_state() is IndicatorState.HELP_COMING
    press(mock_factory.pin(17))
    assert agent.indicator_state() in (IndicatorState.PENDING, IndicatorState.ACKNOWLEDGED)


def test_silent_alert_sends_nothing_back(receiver, agent, responder, mock_factory, ack_topic):
    press(mock_factory.pin(27))
    silent = stored_alert(receiver, "duress")
    visible = press_until_acknowledged(agent, receiver, mock_factory)
    assert responder.help_is_coming(silent) is False
    assert responder.help_is_coming(visible) is True  # same topic, same publisher: arrives after anything before it
    (only,) = responding_seen(ack_topic)
    claims = verify_claims(RespondingClaims, only, agent.help_coming.centre_key)
    assert (str(claims.event_id), claims.seq) == (visible.event_id, visible.seq)
    assert wait_until(lambda: agent.help_coming.shown == 1, 10)
    assert agent.help_coming.refused == {}


def test_a_responding_message_for_a_silent_alert_is_never_shown(receiver, agent, mock_factory):
    """Defence in depth: even a genuine, centre-signed message about a silent alert changes nothing."""
    press(mock_factory.pin(27))
    silent = stored_alert(receiver, "duress")
    assert wait_until(lambda: agent.delivery.stats.acknowledged >= 1, 10)
    led = LedWatch(mock_factory.pin(LED))
    send(receiver, claims_for(silent))
    assert wait_until(lambda: agent.help_coming.refused["silent"] == 1, 10)
    assert agent.indicator_state() is IndicatorState.IDLE
    assert agent.indicator.state is IndicatorState.IDLE
    assert all(not lit or seconds < 0.2 for lit, seconds in led.intervals())  # still the idle flash


@pytest.mark.parametrize(
    ("reason", "change"),
    [
        ("stale", lambda alert: {"sent": time.time() - RESPONDING_MAX_AGE_S - 60}),
        ("stale", lambda alert: {"sent": time.time() + RESPONDING_MAX_AGE_S + 60}),
        ("wrong_device", lambda alert: {"device": "cp-2"}),
        ("unknown_alert", lambda alert: {"event_id": str(uuid.uuid4())}),
        ("unknown_alert", lambda alert: {"seq": alert.seq + 1}),
        ("malformed", lambda alert: {"operator": "Jane Doe"}),  # no room for personal data: unknown keys refused
    ],
)
def test_refused_responding_messages_are_counted(receiver, agent, mock_factory, reason, change):
    alert = press_until_acknowledged(agent, receiver, mock_factory)
    send(receiver, claims_for(alert, **change(alert)))
    assert wait_until(lambda: agent.help_coming.refused[reason] == 1, 10)
    assert agent.indicator_state() is IndicatorState.ACKNOWLEDGED
    assert agent.delivery.stats.bad_acks == {}  # routed to its own check, not counted as a bad ack


def test_forged_responding_message_is_refused(receiver, agent, mock_factory, tmp_path):
    alert = press_until_acknowledged(agent, receiver, mock_factory)
    impostor = MessageSigner(generate_private_key(tmp_path / "impostor.pem"))
    send(receiver, claims_for(alert), signer=impostor)
    assert wait_until(lambda: agent.help_coming.refused["bad_signature"] == 1, 10)
    assert agent.indicator_state() is IndicatorState.ACKNOWLEDGED


def test_replayed_responding_message_is_refused(receiver, agent, mock_factory):
    alert = press_until_acknowledged(agent, receiver, mock_factory)
    token = send(receiver, claims_for(alert))
    assert wait_until(lambda: agent.help_coming.shown == 1, 10)
    agent.help_coming.new_press()  # as if the person pressed again: a replay must not bring it back
    receiver.link.publish("edge/demo-site/cp-1/ack", token, qos=1)
    assert wait_until(lambda: agent.help_coming.refused["replayed"] == 1, 10)
    assert agent.help_coming.shown == 1 and not agent.help_coming.showing


def test_a_test_alert_may_show_it(receiver, agent, responder):
    agent.raise_alert("help", test=True)
    assert wait_until(lambda: receiver.store.messages(kind="alert"), 10)
    (alert,) = receiver.store.messages(kind="alert")
    assert alert.test and responder.help_is_coming(alert) is True
    assert wait_until(lambda: agent.indicator_state() is IndicatorState.HELP_COMING, 10)


def test_help_is_coming_ends_after_help_display_s(site, receiver, responder, mock_factory):
    config = site.add_device("cp-1", body=BUTTONS.replace("help_display_s = 600", "help_display_s = 1"))
    with Agent(config, pin_factory=mock_factory) as agent:
        assert agent.link.wait_connected(10)
        alert = press_until_acknowledged(agent, receiver, mock_factory)
        responder.help_is_coming(alert)
        assert wait_until(lambda: agent.indicator_state() is IndicatorState.HELP_COMING, 10)
        assert wait_until(lambda: agent.indicator.state is IndicatorState.ACKNOWLEDGED, 5)  # ack_display_s is 30


def stored(kind="alert", **body):
    claims = {"body": {"button": "help", "alert_kind": "assistance", "silent": False, **body}}
    return StoredMessage("cp-1", 7, str(uuid.uuid4()), "demo-site", kind, False, 1.7e9, 1.7e9, claims)


@pytest.mark.parametrize(
    ("alert", "revealed"),
    [
        (stored(), True),
        (stored(silent=True), False),
        (stored(alert_kind="duress"), False),  # duress is never answered, whatever its silent flag says
        (stored(silent=None), False),  # fail closed: only an explicit silent = false is answered
        (stored(silent="false"), False),
        (stored(kind="event"), False),  # camera and device events have nobody waiting at a button
    ],
)
def test_only_visible_button_alerts_are_answered(alert, revealed):
    published = []
    responder = Responder(MessageSigner(CENTRE_KEY), TopicLayout("edge"), lambda t, p: published.append(t), "c")
    assert may_reveal(alert) is revealed
    assert responder.help_is_coming(alert) is revealed
    assert published == (["edge/demo-site/cp-1/ack"] if revealed else [])
