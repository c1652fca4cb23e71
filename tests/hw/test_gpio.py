"""Buttons, tamper switch and indicator on gpiozero's MockFactory."""

import time

import pytest

from hw.gpio import BUZZER_PATTERNS, LED_PATTERNS, AlertButton, IndicatorState, StatusIndicator, TamperSwitch
from tests.conftest import wait_until
from tests.led import LedWatch, assert_blinks, wait_blinks, wait_steady_on


def press(pin, hold_s: float = 0.0):
    pin.drive_low()
    if hold_s:
        time.sleep(hold_s)  # deliberate: the button is held this long
    pin.drive_high()


def test_press_fires_once_per_press(mock_factory):
    with AlertButton(17, name="help") as button:
        fired = []
        button.when_activated = fired.append
        press(mock_factory.pin(17))
        assert fired == [button]
        time.sleep(0.05)  # deliberate: past the 30 ms bounce lockout
        press(mock_factory.pin(17))
        assert len(fired) == 2


def test_contact_bounce_counts_as_one_press(mock_factory):
    pin = mock_factory.pin(17)
    with AlertButton(17, bounce_s=0.03) as button:
        fired = []
        button.when_activated = fired.append
        for _ in range(6):  # a bouncing contact: six edges within a few milliseconds
            pin.drive_low()
            pin.drive_high()
        pin.drive_low()
        time.sleep(0.05)  # deliberate: the contact settles, held past the lockout
        pin.drive_high()
        assert len(fired) == 1


def test_hold_fires_only_after_the_hold_time(mock_factory):
    pin = mock_factory.pin(17)
    with AlertButton(17, activation="hold", hold_s=0.3) as button:
        fired = []
        button.when_activated = fired.append
        press(pin, hold_s=0.1)
        time.sleep(0.3)  # deliberate: past the hold time, a short press must not have fired
        assert fired == []
        pin.drive_low()
        assert wait_until(lambda: fired, timeout=2)
        time.sleep(0.5)  # deliberate: held on past the hold time
        pin.drive_high()
        assert len(fired) == 1  # holding longer does not repeat


def test_multi_press_needs_all_presses_within_the_window(mock_factory):
    pin = mock_factory.pin(17)
    with AlertButton(17, activation="multi-press", presses=3, window_s=0.6, bounce_s=0.01) as button:
        fired = []
        button.when_activated = fired.append
        for _ in range(2):
            press(pin)
            time.sleep(0.02)  # deliberate: presses 20 ms apart, past the 10 ms lockout
        assert fired == []
        time.sleep(0.7)  # deliberate: the window passes, start again
        for _ in range(2):
            press(pin)
            time.sleep(0.02)  # deliberate: presses 20 ms apart, past the 10 ms lockout
        assert fired == []
        press(pin)
        assert len(fired) == 1


def test_unknown_activation_is_refused(mock_factory):
    with pytest.raises(ValueError, match="button 'x': activation must be one of press, hold, multi-press, not 'twice'"):
        AlertButton(17, name="x", activation="twice")


def test_a_failing_handler_does_not_break_the_button(mock_factory):
    with AlertButton(17, bounce_s=0) as button:
        calls = []

        def handler(b):
            calls.append(b)
            raise RuntimeError("boom")

        button.when_activated = handler
        press(mock_factory.pin(17))
        press(mock_factory.pin(17))
        assert len(calls) == 2


def test_tamper_switch_reports_opened_and_closed(mock_factory):
    pin = mock_factory.pin(22)
    with TamperSwitch(22, bounce_s=0) as switch:
        events = []
        switch.when_opened = lambda: events.append("opened")
        switch.when_closed = lambda: events.append("closed")
        assert switch.is_open  # pulled up, nothing pressing the switch
        pin.drive_low()
        assert not switch.is_open
        pin.drive_high()
        assert events == ["closed", "opened"]
        assert "is_open=True" in repr(switch)


def test_indicator_states_have_distinct_led_patterns(mock_factory):
    with StatusIndicator(led_pin=5, buzzer_pin=6) as indicator:
        led = mock_factory.pin(5)
        indicator.show(IndicatorState.ACKNOWLEDGED)
        assert wait_steady_on(led, timeout=5)  # steady: lit and unchanged for longer than any blink's on-time
        indicator.show(IndicatorState.PENDING)
        wait_blinks(led, 0.1, 0.1, cycles=3)  # fast blink
        indicator.show(IndicatorState.FAULT)
        wait_blinks(led, 0.5, 0.5, cycles=1)  # slow blink
        assert indicator.state is IndicatorState.FAULT


def test_idle_led_is_a_short_flash_every_two_seconds(mock_factory):
    with StatusIndicator(led_pin=5) as indicator:
        indicator.show(IndicatorState.IDLE)
        wait_blinks(mock_factory.pin(5), 0.05, 1.95, cycles=1)


def test_help_coming_has_its_own_led_and_buzzer_pattern(mock_factory):
    assert len({str(p) for p in LED_PATTERNS.values()}) == len(LED_PATTERNS) == len(IndicatorState)
    assert len(set(BUZZER_PATTERNS.values())) == len(BUZZER_PATTERNS)
    with StatusIndicator(led_pin=5, buzzer_pin=6) as indicator:
        buzzer = LedWatch(mock_factory.pin(6))
        indicator.show(IndicatorState.HELP_COMING)
        wait_blinks(mock_factory.pin(5), 0.75, 0.25, cycles=2)  # long on, short off
        assert_blinks(buzzer.intervals(), 0.5, 0.25, cycles=1)  # two long beeps
        assert indicator.state is IndicatorState.HELP_COMING
