"""How long to wait for the centre's acknowledgement before sending a message again.

A fixed 15 s makes an alert parked at a dead receiver late by 15 s; a fixed 2 s, during a
10,000-alert catch-up, resends everything still queued at the centre. So, as TCP does (RFC
6298), the wait is learned from measured round trips (smoothed round trip plus four times its
variation), kept between a floor and ``ack_retry_s``, and doubled after each expiry until an
answer comes. Every answer names the copy it answers (``reply_to_sent``), so each round trip is
measured without ambiguity, resends included.
"""

from __future__ import annotations

import threading

#: Never resend sooner than this: a receiver restarted by systemd needs about this long to answer.
FLOOR_S = 2.0
#: Before the first answer: the wait RFC 6298 starts with, clamped like any other.
INITIAL_S = 3.0


class AckTimer:
    """Round-trip estimate of one device's messages to the centre and back."""

    def __init__(self, ceiling_s: float, floor_s: float = FLOOR_S):
        self.floor_s = min(floor_s, ceiling_s)
        self.ceiling_s = ceiling_s
        self.srtt_s: float | None = None
        self.rttvar_s = 0.0
        self._backoff = 1.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<AckTimer timeout={self.timeout_s:.2f} s srtt={self.srtt_s}>"

    def sample(self, rtt_s: float) -> None:
        """An answer came back ``rtt_s`` after its copy was handed to the broker."""
        with self._lock:
            if self.srtt_s is None:
                self.srtt_s, self.rttvar_s = rtt_s, rtt_s / 2
            else:
                self.rttvar_s = 0.75 * self.rttvar_s + 0.25 * abs(self.srtt_s - rtt_s)
                self.srtt_s = 0.875 * self.srtt_s + 0.125 * rtt_s
            self._backoff = 1.0

    def expired(self) -> None:
        """Nothing came back in time: wait twice as long for the copies sent again."""
        with self._lock:
            self._backoff = min(self._backoff * 2, 64.0)

    @property
    def timeout_s(self) -> float:
        with self._lock:
            base = INITIAL_S if self.srtt_s is None else self.srtt_s + 4 * self.rttvar_s
            return min(self.ceiling_s, max(self.floor_s, base) * self._backoff)
