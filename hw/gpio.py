"""GPIO devices of a call point: alert buttons, the tamper switch, status LED and buzzer.

Everything is built on gpiozero devices and passes ``pin_factory`` through, so
the same code runs on lgpio on a Pi and on gpiozero's ``MockFactory`` in tests.
This module knows nothing about alerts or MQTT: it reports activations and
shows states.

Wiring (defaults): buttons and tamper switch between the GPIO pin and ground,
using the internal pull-up; LED and buzzer from the GPIO pin through their
resistor/transistor to ground (active high).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from gpiozero import LED, Button, Buzzer

log = logging.getLogger(__name__)

ACTIVATIONS = ("press", "hold", "multi-press")


class AlertButton:
    """A push button that reports one activation per deliberate press pattern.

    Activation ``press`` fires on the first accepted press edge (no added
    latency); ``hold`` fires once the button has been held ``hold_s``;
    ``multi-press`` fires on the ``presses``-th press within ``window_s``.
    Bounce is rejected in software: any edge closer than ``bounce_s`` to the last
    accepted edge is ignored, which works the same on every pin factory.
    There is deliberately no way to cancel an activation.
    """

    def __init__(
        self,
        pin: int | str,
        *,
        name: str = "button",
        activation: str = "press",
        hold_s: float = 2.0,
        presses: int = 3,
        window_s: float = 2.0,
        bounce_s: float = 0.03,
        pull_up: bool = True,
        pin_factory=None,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"button {name!r}: activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
        self.name = name
        self.activation = activation
        self.presses = presses
        self.window_s = window_s
        self.bounce_s = bounce_s
        self.when_activated: Callable[[AlertButton], None] | None = None
        self.activations = 0
        self._lock = threading.Lock()
        self._last_edge = float("-inf")
        self._press_times: deque[float] = deque()
        self._button = Button(pin, pull_up=pull_up, bounce_time=None, hold_time=hold_s, pin_factory=pin_factory)
        self._button.when_pressed = self._on_press_edge
        self._button.when_released = self._on_release_edge
        if activation == "hold":
            self._button.when_held = self._fire

    def __repr__(self) -> str:
        try:
            return f"<AlertButton {self.name!r} on pin {self._button.pin}, {self.activation}, is_pressed={self.is_pressed}>"
        except Exception:
            return f"<AlertButton {self.name!r} closed>"

    def __enter__(self) -> AlertButton:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pin(self):
        return self._button.pin

    @property
    def is_pressed(self) -> bool:
        return bool(self._button.is_pressed)

    def close(self) -> None:
        self._button.close()

    def _accept_edge(self, now: float) -> bool:
        if now - self._last_edge < self.bounce_s:
            return False
        self._last_edge = now
        return True

    def _on_press_edge(self) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._accept_edge(now):
                return
            if self.activation == "press":
                fire = True
            elif self.activation == "multi-press":
                self._press_times.append(now)
                while self._press_times and now - self._press_times[0] > self.window_s:
                    self._press_times.popleft()
                fire = len(self._press_times) >= self.presses
                if fire:
                    self._press_times.clear()
            else:
                fire = False
        if fire:
            self._fire()

    def _on_release_edge(self) -> None:
        with self._lock:
            self._accept_edge(time.monotonic())

    def _fire(self) -> None:
        self.activations += 1
        handler = self.when_activated
        if handler is None:
            return
        try:
            handler(self)
        except Exception:
            log.exception("handling activation of button %r failed", self.name)


class TamperSwitch:
    """The enclosure's tamper switch: reports opened and closed, debounced.

    By default the switch is held closed (pressed) by the shut lid, so a
    released switch means the enclosure is open.
    """

    def __init__(
        self,
        pin: int | str,
        *,
        pull_up: bool = True,
        closed_when_pressed: bool = True,
        bounce_s: float = 0.05,
        pin_factory=None,
    ):
        self.closed_when_pressed = closed_when_pressed
        self.when_opened: Callable[[], None] | None = None
        self.when_closed: Callable[[], None] | None = None
        self._bounce_s = bounce_s
        self._last_report: tuple[bool, float] | None = None
        self._lock = threading.Lock()
        self._switch = Button(pin, pull_up=pull_up, bounce_time=None, pin_factory=pin_factory)
        self._switch.when_pressed = self._changed
        self._switch.when_released = self._changed

    def __repr__(self) -> str:
        return f"<TamperSwitch on pin {self._switch.pin}, is_open={self.is_open}>"

    def __enter__(self) -> TamperSwitch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return bool(self._switch.is_pressed) != self.closed_when_pressed

    def close(self) -> None:
        self._switch.close()

    def _changed(self) -> None:
        now = time.monotonic()
        with self._lock:
            is_open = self.is_open
            if self._last_report is not None:
                last_open, last_at = self._last_report
                if last_open == is_open or now - last_at < self._bounce_s:
                    return
            self._last_report = (is_open, now)
        handler = self.when_opened if is_open else self.when_closed
        if handler is not None:
            try:
                handler()
            except Exception:
                log.exception("handling tamper switch change failed")


class IndicatorState(enum.Enum):
    """What the person at the button needs to know, in order of precedence (the device decides which to show).

    A press that could not be stored (FAULT) beats everything; then HELP_COMING (an operator took
    charge: it implies the centre has the alert, so it beats PENDING and ACKNOWLEDGED and outlasts a
    lost link); then PENDING, ACKNOWLEDGED, and IDLE, or FAULT when there is no path to the broker;
    SAFE_MODE stands in for IDLE while the device runs a fallback configuration.
    """

    IDLE = "idle"  # healthy, ready
    PENDING = "pending"  # alert accepted, not yet confirmed by the centre
    ACKNOWLEDGED = "acknowledged"  # the centre has it
    HELP_COMING = "help_coming"  # an operator at the centre is sending help
    FAULT = "fault"  # no path to the broker, or a press not stored
    SAFE_MODE = "safe-mode"  # buttons work, but the configuration did not validate: running a fallback


# LED (on_s, off_s); None means steadily on.
LED_PATTERNS: dict[IndicatorState, tuple[float, float] | None] = {
    IndicatorState.IDLE: (0.05, 1.95),
    IndicatorState.PENDING: (0.1, 0.1),
    IndicatorState.ACKNOWLEDGED: None,
    IndicatorState.HELP_COMING: (0.75, 0.25),  # long on, short off: a slow "heartbeat", unlike steady or 50/50
    IndicatorState.FAULT: (0.5, 0.5),
    IndicatorState.SAFE_MODE: (0.3, 1.5),  # a slow single blink: unlike help coming (mostly on) or a fault (even)
}
# Buzzer (on_s, off_s, count) played once when the state is entered.
BUZZER_PATTERNS: dict[IndicatorState, tuple[float, float, int]] = {
    IndicatorState.PENDING: (0.15, 0.1, 1),
    IndicatorState.ACKNOWLEDGED: (0.1, 0.1, 3),
    IndicatorState.HELP_COMING: (0.5, 0.25, 2),  # two long beeps, unlike the ack's three short ones
}


class StatusIndicator:
    """Status LED and optional buzzer; each state has its own blink and beep pattern."""

    def __init__(self, led_pin: int | str | None = None, buzzer_pin: int | str | None = None, pin_factory=None):
        self._led = LED(led_pin, pin_factory=pin_factory) if led_pin is not None else None
        self._buzzer = Buzzer(buzzer_pin, pin_factory=pin_factory) if buzzer_pin is not None else None
        self._state: IndicatorState | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<StatusIndicator state={self.state.value if self.state else None}>"

    def __enter__(self) -> StatusIndicator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def state(self) -> IndicatorState | None:
        return self._state

    def show(self, state: IndicatorState) -> None:
        with self._lock:
            if state == self._state:
                return
            self._state = state
            if self._led is not None:
                pattern = LED_PATTERNS[state]
                if pattern is None:
                    self._led.on()
                else:
                    self._led.blink(on_time=pattern[0], off_time=pattern[1])
            if self._buzzer is not None and state in BUZZER_PATTERNS:
                on_s, off_s, count = BUZZER_PATTERNS[state]
                self._buzzer.beep(on_time=on_s, off_time=off_s, n=count)

    def close(self) -> None:
        for device in (self._led, self._buzzer):
            if device is not None:
                device.close()
