"""The console in a real browser (Debian's chromium, headless): what an operator may and may not do.

A real call point on gpiozero's mock pins, a real mosquitto and receiver, the console beside them on the
same store. Set EDGE_AGENT_SCREENSHOTS=1 to write the README's screenshots into docs/.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from agent.centre.receiver import Receiver
from agent.config.centre import load_receiver_config
from agent.console.server import Console
from agent.device.agent import Agent
from agent.protocol.enrolment import Position, enrolment_record
from agent.protocol.signing import load_private_key
from hw.gpio import IndicatorState
from tests.conftest import REPO, wait_until
from tests.console.conftest import ACCOUNTS, add_accounts, csrf_of, live, log_in

BUTTONS = (
    '[[buttons]]\nname = "help"\npin = 17\nlocation = "Market square, north gate"\n\n'
    '[[buttons]]\nname = "duress"\npin = 27\nalert_kind = "duress"\nsilent = true\n'
    'location = "Market square, kiosk"\n\n'
    "[indicator]\nled_pin = 5\nack_display_s = 30\n"
)
SCREENSHOTS = os.environ.get("EDGE_AGENT_SCREENSHOTS") == "1"


def press(pin) -> None:
    pin.drive_low()
    pin.drive_high()
    time.sleep(0.04)  # deliberate: past the bounce lockout


@pytest.fixture
def agent(site, mock_factory):
    config = site.add_device("cp-1", body=BUTTONS)
    with Agent(config, pin_factory=mock_factory) as running:
        assert running.link.wait_connected(10)
        yield running


def screenshot(page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=str(REPO / "docs" / f"console-{name}.png"), full_page=True)


@pytest.fixture
def second_console(site, console):
    """Another console process's worth (its own sessions, feed and MQTT link) on the same store."""
    with Console(site.receiver_config, listen="127.0.0.1:0") as other:
        other.start()
        yield other


def test_a_press_is_queued_within_two_seconds_taken_on_one_console_seen_on_the_other_and_closed_with_a_note(
    browser, console, second_console, agent, mock_factory
):
    ana, bo = log_in(browser, console, "ana"), log_in(browser, second_console, "bo")
    assert (ana.url, bo.url) == (console.url, second_console.url)  # logged in: on the queue
    for page in (ana, bo):
        live(page)
    pressed = time.monotonic()
    press(mock_factory.pin(17))
    ana.wait_for_selector("tr.alert-row.real", timeout=2000)  # press → device → broker → receiver → page
    shown_s = time.monotonic() - pressed
    row = ana.locator("tr.alert-row.real")
    assert "assistance" in row.inner_text() and "Market square, north gate" in row.inner_text()
    assert ana.evaluate("document.body.dataset.rang") == "1"  # the sound of a real alert
    print(f"press → shown in the queue: {shown_s:.2f} s")

    row.locator("a").click()
    ana.click("#take-form button")
    assert "taken" in ana.inner_text("#notice")
    assert "ana" in ana.inner_text("#handling-state")
    bo.wait_for_selector("tr.alert-row .taken-by:has-text('taken by ana')", timeout=2000)  # the other console, live
    if console.responder is not None:  # the signed "responding" message: the call point shows help is coming
        assert wait_until(lambda: agent.indicator_state() is IndicatorState.HELP_COMING, 5)
        assert "the device shows that help is coming" in ana.inner_text("#notice")
    screenshot(bo, "queue")
    screenshot(ana, "alert")

    ana.select_option("select[name=outcome]", "help-sent")
    ana.fill("textarea[name=note]", "Patrol 12 on site at 14:02; person escorted home")
    ana.click("#close-form button")
    assert "closed" in ana.inner_text("#notice")
    bo.wait_for_selector("tr[data-closed] >> text=help-sent", timeout=2000)
    assert bo.locator("tr.alert-row").count() == 0

    sam = log_in(browser, console, "sam")
    sam.goto(console.url + "audit")
    close = sam.locator("tr[data-action=close]")
    assert "ana" in close.inner_text() and "Patrol 12 on site" in close.inner_text()
    assert sam.locator("tr[data-action=take-charge]").count() == 1
    actions = [entry.action for entry in console.state.audit_log()]
    assert actions[:2] == ["login", "close"] and "take-charge" in actions


def test_a_test_alert_looks_different_and_never_rings_a_duress_alert_stands_out(browser, console, agent, mock_factory):
    ana = log_in(browser, console, "ana")
    live(ana)
    agent.raise_alert("help", test=True)
    test_row = ana.wait_for_selector("tr.alert-row.test", timeout=5000)
    assert "TEST" in test_row.inner_text()
    assert ana.evaluate("document.body.dataset.rang") == "0"  # a test alert never sounds like a real one
    press(mock_factory.pin(27))
    duress = ana.wait_for_selector("tr.alert-row.real.silent", timeout=5000)
    assert "SILENT / DURESS" in duress.inner_text()
    assert ana.evaluate("document.body.dataset.rang") == "1"
    ana.locator("tr.alert-row.silent a").click()
    ana.click("#take-form button")  # taken at the centre; nothing goes back that would reveal it
    assert "nothing sent to the device" in ana.inner_text("#notice") or console.responder is None
    assert agent.indicator_state() is not getattr(IndicatorState, "HELP_COMING", None)
    ana.goto(console.url)
    if SCREENSHOTS:
        press(mock_factory.pin(17))
        ana.wait_for_selector("tr.alert-row.real:not(.silent)", timeout=5000)
        screenshot(ana, "queue-mixed")


def test_a_supervisor_gives_an_alert_ana_holds_to_bo_and_an_operator_may_not(browser, console, agent, mock_factory):
    press(mock_factory.pin(17))
    assert wait_until(lambda: console.state.queue()[0], 10)
    (alert,), _ = console.state.queue()
    assert console.state.take(alert, "ana", time.time())
    where = f"{console.url}alerts/{alert.device}/{alert.seq}"

    ana = log_in(browser, console, "ana")
    ana.goto(where)
    assert ana.locator("#reassign-form").count() == 0
    refused = ana.request.post(where + "/reassign", form={"csrf": csrf_of(ana), "holder": "ana", "to": "bo"})
    assert refused.status == 403 and "operator" in refused.text()

    sam = log_in(browser, console, "sam")
    sam.goto(where)
    options = sam.locator("#reassign-form select[name=to] option").all_inner_texts()
    assert options == ["bo", "sam"]  # whoever may hold an alert, but not its holder (nor the installer)
    sam.select_option("#reassign-form select[name=to]", "bo")
    sam.click("#reassign-form button")
    assert "given to bo" in sam.inner_text("#notice")
    assert "bo" in sam.inner_text("#handling-state")
    assert console.state.alert(alert.device, alert.seq).taken_by == "bo"
    (entry,) = [e for e in console.state.audit_log() if e.action == "reassign"]
    assert (entry.actor, entry.detail) == ("sam", "from ana to bo")


def test_five_wrong_passwords_refuse_even_the_right_one(browser, console):
    for _ in range(5):
        page = log_in(browser, console, "ana", password="not the password")
        assert page.inner_text("#login-error") == "wrong name or password"
    page = log_in(browser, console, "ana")  # the right password, too late
    assert "too many failed logins" in page.inner_text("#login-error")
    assert "edge_console_session" not in {c["name"] for c in page.context.cookies()}
    assert log_in(browser, console, "bo").url == console.url  # another account from elsewhere is not locked


def test_actions_without_the_csrf_token_or_the_role_are_refused(browser, console, agent, mock_factory):
    press(mock_factory.pin(17))
    assert wait_until(lambda: console.state.queue()[0], 10)
    (alert,), _ = console.state.queue()
    take = f"{console.url}alerts/{alert.device}/{alert.seq}/take"
    ana = log_in(browser, console, "ana")
    (cookie,) = [c for c in ana.context.cookies() if c["name"] == "edge_console_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    for form in ({}, {"csrf": "forged"}):
        refused = ana.request.post(take, form=form, max_redirects=0)
        assert refused.status == 403 and "CSRF" in refused.text()
    assert ana.request.post(console.url + "logout", form={}, max_redirects=0).status == 403
    assert console.state.alert(alert.device, alert.seq).state == "open"

    ian = log_in(browser, console, "ian")  # installer: read only
    ian.goto(f"{console.url}alerts/{alert.device}/{alert.seq}")
    assert ian.locator("#take-form").count() == 0
    refused = ian.request.post(take, form={"csrf": csrf_of(ian)}, max_redirects=0)
    assert refused.status == 403 and "installer" in refused.text()
    assert ian.request.get(console.url + "audit", max_redirects=0).status == 403
    assert console.state.alert(alert.device, alert.seq).state == "open"

    taken = ana.request.post(take, form={"csrf": csrf_of(ana)}, max_redirects=0)
    assert taken.status == 303
    assert console.state.alert(alert.device, alert.seq).taken_by == "ana"


def enrol_at(site, device_id: str, body: str, position: Position, location: str):
    """A device enrolled with a position and mounted location, as ``provision --lat/--lon`` records them."""
    config = site.add_device(device_id, body=body, enroll=False)
    key = load_private_key(config.secret_dirs[0] / config.identity.private_key_file)
    site.keyring.enroll(enrolment_record(device_id, site.site, "call-point", key, position=position, location=location))
    return config


def test_a_device_killed_with_sigkill_shows_as_missing_on_the_fleet_page_and_the_map(browser, site, mock_factory):
    heartbeat = "[telemetry]\ninterval_s = 5\n"
    enrol_at(
        site, "cp-k", f'[[buttons]]\nname = "help"\npin = 17\n{heartbeat}', Position(48.8566, 2.3522), "Rue de Rivoli"
    )
    neighbours = [
        enrol_at(site, f"cp-{n}", f'[[buttons]]\nname = "help"\npin = {pin}\n{heartbeat}', Position(lat, lon), where)
        for n, pin, lat, lon, where in ((2, 23, 48.8606, 2.3376, "Louvre"), (3, 24, 48.8530, 2.3499, "Notre-Dame"))
    ]
    path = site.receiver_toml_path()
    text = path.read_text().replace(
        'credentials_dir = "credentials"', 'credentials_dir = "credentials"\nsupervision_s = 10'
    )
    path.write_text(text)
    config = load_receiver_config(path)
    argv = [sys.executable, "-m", "agent.cli", "run", "--mock-pins", "--config", str(site.device_config_path("cp-k"))]
    with Receiver(config), Console(config, listen="127.0.0.1:0") as console, contextlib.ExitStack() as running:
        for neighbour in neighbours:  # two call points that stay up, in this process on mock pins
            running.enter_context(Agent(neighbour, pin_factory=mock_factory))
        add_accounts(console.state)
        console.start()
        device = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            sam = log_in(browser, console, "sam")
            sam.goto(console.url + "fleet")
            live(sam)
            sam.wait_for_selector("tr[data-device=cp-k][data-state=online]", timeout=20000)
            device.send_signal(signal.SIGKILL)
            device.wait()
            killed = time.monotonic()
            row = sam.wait_for_selector("tr[data-device=cp-k][data-state=missing]", timeout=30000)
            print(f"SIGKILL → missing on the fleet page: {time.monotonic() - killed:.1f} s (supervision 10 s)")
            assert "MISSING" in row.inner_text() and "Rue de Rivoli" in row.inner_text()
            assert "1 missing" in sam.inner_text("h1")
            screenshot(sam, "fleet")
            sam.goto(console.url + "map")
            assert sam.locator("g.map-device[data-device=cp-k][data-state=missing]").count() == 1
            assert sam.locator("g.map-device[data-state=online]").count() == 2
            screenshot(sam, "map")
        finally:
            if device.poll() is None:
                device.kill()
                device.wait()


def test_accounts_hold_argon2_hashes_never_passwords(console):
    stored_hash, role = console.state.operator("ana")
    assert stored_hash.startswith("$argon2id$") and ACCOUNTS["ana"][0] not in stored_hash
    assert role == "operator"
    assert isinstance(console, Console)
