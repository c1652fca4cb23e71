"""Capped exponential backoff for loops that retry on their own schedule (an event loop, a process supervisor).

Retry libraries (tenacity, backoff) wrap a call in a decorator; these loops instead wait on
events between attempts, so they need only the delay arithmetic, in one place.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays ``first_s``, twice that, … up to ``cap_s``; ``reset()`` after a success.

    With ``jitter``, each delay is drawn from [half, whole] of its value, so many devices
    failing together do not retry together.
    """

    def __init__(self, first_s: float, cap_s: float, jitter: bool = False):
        if first_s <= 0 or cap_s < first_s:
            raise ValueError(f"backoff needs 0 < first_s <= cap_s, got {first_s} and {cap_s}")
        self.first_s = first_s
        self.cap_s = cap_s
        self.jitter = jitter
        self._next = first_s

    def __repr__(self) -> str:
        return f"<Backoff next={self._next:g} s cap={self.cap_s:g} s>"

    def next(self) -> float:
        """The delay before the next attempt; the one after is longer, up to the cap."""
        delay = self._next
        self._next = min(self._next * 2, self.cap_s)
        return random.uniform(delay / 2, delay) if self.jitter else delay

    def reset(self) -> None:
        self._next = self.first_s
