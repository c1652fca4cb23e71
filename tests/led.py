"""Watching an LED over time: a blink pattern or a steady light, never one lucky sample of the pin.

A blinking LED read once is on about half the time, so a single read can pass by chance.
These helpers look at complete on and off intervals instead: from gpiozero's MockPin history
(``pin.states``: each entry is a new level and how long the previous one lasted) or, on real
hardware, from sampling the line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from itertools import pairwise

from tests.conftest import wait_until

#: Longer than any blink's on-time (fault: 0.5 s): a blinking LED is never unchanged for this long.
STEADY_S = 1.0

Intervals = list[tuple[bool, float]]  # (lit, seconds), each begun and ended while watched


class LedWatch:
    """The changes of a MockPin from the moment of construction on."""

    def __init__(self, pin):
        self.pin = pin
        self._start = len(pin.states)

    def intervals(self) -> Intervals:
        states = list(self.pin.states)[self._start :]
        return [(before.state, after.timestamp) for before, after in pairwise(states)]


def sample_line(read: Callable[[], bool], seconds: float, every_s: float = 0.002) -> list[tuple[float, bool]]:
    """(time, lit) of a line read every ``every_s`` for ``seconds`` (for real hardware)."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append((time.monotonic(), bool(read())))
        time.sleep(every_s)
    return samples


def intervals_of(samples: list[tuple[float, bool]]) -> Intervals:
    """Complete intervals between the level changes seen in ``samples``."""
    changes = [(at, lit) for (_, before), (at, lit) in pairwise(samples) if lit != before]
    return [(lit, end - start) for (start, lit), (end, _) in pairwise(changes)]


def complete_cycles(intervals: Intervals) -> int:
    return min(sum(1 for lit, _ in intervals if lit), sum(1 for lit, _ in intervals if not lit))


def close_to(actual: float, expected: float) -> bool:
    """Within 25 % + 60 ms: blink threads wake late on a loaded machine, never early."""
    return math.isclose(actual, expected, rel_tol=0.25, abs_tol=0.06)


def assert_blinks(intervals: Intervals, on_s: float, off_s: float, cycles: int = 2) -> None:
    """At least ``cycles`` complete on and off intervals, each of the pattern's length."""
    assert complete_cycles(intervals) >= cycles, f"fewer than {cycles} blink cycles of ({on_s}, {off_s}): {intervals}"
    for lit, seconds in intervals:
        expected = on_s if lit else off_s
        assert close_to(seconds, expected), (
            f"{'on' if lit else 'off'} for {seconds:.3f} s, expected {expected} s: {intervals}"
        )


def wait_blinks(pin, on_s: float, off_s: float, cycles: int = 2) -> None:
    """Watch a MockPin until it has blinked ``cycles`` times, then check the timing of every interval seen."""
    watch = LedWatch(pin)
    wait_until(lambda: complete_cycles(watch.intervals()) >= cycles, timeout=cycles * (on_s + off_s) * 3 + 2)
    assert_blinks(watch.intervals(), on_s, off_s, cycles)


def wait_steady_on(pin, timeout: float = 10.0) -> bool:
    """True once a MockPin has been lit, without a single change, for ``STEADY_S``."""
    seen = {"changes": len(pin.states), "since": time.monotonic()}

    def lit_and_unchanged_long_enough() -> bool:
        if len(pin.states) != seen["changes"] or not pin.state:
            seen["changes"], seen["since"] = len(pin.states), time.monotonic()
            return False
        return time.monotonic() - seen["since"] >= STEADY_S

    return wait_until(lit_and_unchanged_long_enough, timeout)
