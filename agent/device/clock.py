"""The device's clock, corrected by what the centre says the time is.

Every acknowledgement and every NAK from the centre is signed and carries the
centre's time. A device whose clock is wrong (no NTP on a closed network, a
dead RTC battery) learns the offset from them and signs with corrected time,
so its messages pass the centre's freshness window; it also reports the offset
so that somebody fixes the clock.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

#: Offsets smaller than this are network delay and jitter, not a wrong clock.
TOLERANCE_S = 2.0


class CentreClock:
    """Local time plus the last offset learned from the centre (0 until an answer shows otherwise)."""

    def __init__(self, tolerance_s: float = TOLERANCE_S):
        self.tolerance_s = tolerance_s
        self.offset_s = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.time() + self.offset_s

    def learn(self, centre_time: float, received_at: float) -> None:
        """One signed sample: the centre's time when it answered, and our local time when it arrived."""
        sample = centre_time - received_at
        with self._lock:
            if abs(sample - self.offset_s) <= self.tolerance_s:
                return
            self.offset_s = 0.0 if abs(sample) <= self.tolerance_s else sample
        if self.offset_s:
            log.warning("device clock is off by %+.1f s against the centre; signing with corrected time", -sample)
        else:
            log.info("device clock agrees with the centre again")

    @property
    def error_s(self) -> float:
        """How far the local clock is off (positive: ahead of the centre), for status and telemetry."""
        return round(-self.offset_s, 1)
