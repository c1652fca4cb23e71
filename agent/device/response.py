"""On the device: the centre's signed "help is coming" for one of our alerts, shown for a while.

The message arrives on the ``ack`` topic beside the acknowledgements. It is believed only when
signed by the centre's key, meant for this device, fresh by the corrected clock, never seen
before, and about an alert this device raised and that was not silent. Anything else is refused
and counted under its reason; nothing in it can stop the thread that handed it over.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from agent.device.clock import CentreClock
from agent.errors import SignatureInvalid
from agent.protocol.messages import RESPONDING_MAX_AGE_S, RespondingClaims
from agent.protocol.signing import verify_claims

log = logging.getLogger(__name__)

#: How many of our recent alerts the centre may answer: far more than anyone presses in ten minutes.
KNOWN_ALERTS = 256
#: How the centre's signer writes the kind (compact JSON, sorted keys).
RESPONDING_MARK = b'"kind":"responding"'


def names_responding(payload: bytes) -> bool:
    """Whether a message on the ack topic says it is a "responding" one: routing only, nothing is trusted yet.

    A look at the unverified payload segment, cheap enough for every acknowledgement on paho's thread.
    Either way the message is verified in full by the path it is routed to, which refuses and counts it.
    """
    segments = payload.split(b".")
    if len(segments) != 3:
        return False
    try:
        claims = base64.urlsafe_b64decode(segments[1] + b"=" * (-len(segments[1]) % 4))
    except (ValueError, binascii.Error):
        return False
    return RESPONDING_MARK in claims


class HelpComing:
    """Verifies "responding" messages and keeps the "help is coming" state for ``hold_s`` or until the next press."""

    def __init__(
        self,
        device: str,
        centre_key: Any,
        *,
        clock: CentreClock,
        hold_s: float,
        on_change: Callable[[], None] = lambda: None,
    ):
        self.device = device
        self.centre_key = centre_key
        self.clock = clock
        self.hold_s = hold_s
        self.on_change = on_change
        self.shown = 0
        self.refused: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._alerts: OrderedDict[str, tuple[int, bool]] = OrderedDict()  # event id -> (seq, silent)
        self._used: dict[str, float] = {}  # message id -> keep until (corrected clock)
        self._until = 0.0  # monotonic

    @property
    def showing(self) -> bool:
        return time.monotonic() < self._until

    def expect(self, seq: int, event_id: str, silent: bool) -> None:
        """An alert of ours the centre may answer; a silent one is remembered so that an answer is refused."""
        with self._lock:
            self._alerts[str(event_id)] = (seq, silent)
            self._alerts.move_to_end(str(event_id))
            while len(self._alerts) > KNOWN_ALERTS:
                self._alerts.popitem(last=False)

    def new_press(self) -> None:
        """A visible press starts a new call for help: the old answer no longer applies to it."""
        with self._lock:
            was_showing, self._until = self.showing, 0.0
        if was_showing:
            self.on_change()

    def handle(self, payload: bytes) -> bool:
        """Verify one message; True when it is shown. Never raises: a refusal is logged and counted."""
        try:
            message = verify_claims(RespondingClaims, payload, self.centre_key)
            self._check(message)
        except SignatureInvalid as exc:
            return self._refuse(exc.reason, str(exc))
        except Exception as exc:  # noqa: BLE001 - hostile input: nothing in it may escape
            return self._refuse("malformed", f"{type(exc).__name__}: {exc}")
        self.shown += 1
        log.info("the centre says help is coming for alert seq %d", message.seq)
        self.on_change()
        return True

    def _check(self, message: RespondingClaims) -> None:
        """Raise SignatureInvalid with a reason unless the message may be shown; shows it (under the lock) if so."""
        if message.device != self.device:
            raise SignatureInvalid("wrong_device", f"'responding' is for device {message.device!r}")
        now = self.clock.now()
        if abs(now - message.sent) > RESPONDING_MAX_AGE_S:
            raise SignatureInvalid("stale", f"'responding' was sent {now - message.sent:.0f} s from now")
        with self._lock:
            known = self._alerts.get(str(message.event_id))
            if known is None or known[0] != message.seq:
                raise SignatureInvalid(
                    "unknown_alert", f"'responding' names no recent alert of ours (seq {message.seq})"
                )
            if known[1]:
                raise SignatureInvalid("silent", f"'responding' for silent alert seq {message.seq}: never shown")
            self._used = {k: until for k, until in self._used.items() if until >= now}
            if str(message.id) in self._used:
                raise SignatureInvalid("replayed", f"'responding' {message.id} was already shown")
            self._used[str(message.id)] = message.sent + 2 * RESPONDING_MAX_AGE_S
            self._until = time.monotonic() + self.hold_s

    def _refuse(self, reason: str, text: str) -> bool:
        with self._lock:
            self.refused[reason] += 1
        log.warning("ignored 'responding' message: %s", text)
        return False

    def report(self) -> dict[str, Any]:
        """For status and telemetry."""
        with self._lock:
            return {"showing": self.showing, "shown": self.shown, "refused": dict(self.refused)}
