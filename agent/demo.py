"""``edge-agent demo``: a broker, the centre's receiver and a call point on this machine.

The call point uses gpiozero's mock pins; the demo presses its button and
shows what the centre verified and what the person at the button sees.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from gpiozero.pins.mock import MockFactory

from hw.gpio import IndicatorState

from .broker import LocalBroker
from .errors import BrokerUnavailable
from .localsite import LocalSite
from .receiver import Receiver, Verdict
from .service import Agent

CALL_POINT_BODY = (
    '[[buttons]]\nname = "help"\npin = 17\nalert_kind = "assistance"\nlocation = "Street call point, north side"\n\n'
    '[[buttons]]\nname = "duress"\npin = 27\nalert_kind = "duress"\nactivation = "hold"\nhold_s = 1.0\nsilent = true\n\n'
    "[tamper]\npin = 22\n\n[indicator]\nled_pin = 5\nbuzzer_pin = 6\nack_display_s = 5\n"
)


def _say(text: str) -> None:
    print(text, flush=True)


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def run_demo(seconds: float = 0) -> int:
    try:
        broker = LocalBroker()
    except BrokerUnavailable as exc:
        _say(f"The demo needs a local MQTT broker: {exc}")
        return 1
    verdicts: list[Verdict] = []
    seen = threading.Condition()

    def on_verdict(verdict: Verdict) -> None:
        with seen:
            verdicts.append(verdict)
            seen.notify_all()
        claims = verdict.claims
        if claims is not None and claims.kind in ("alert", "tamper") and verdict.outcome == "accepted":
            _say(
                f"  centre: verified {'TEST ' if claims.test else ''}{claims.kind} from {claims.site}/{claims.device} "
                f"seq {claims.seq}: {claims.body}"
            )

    with broker, tempfile.TemporaryDirectory(prefix="edge-demo-") as root:
        _say(f"mosquitto on {broker.host}:{broker.port}; site under {root}")
        site = LocalSite(Path(root), broker)
        config = site.add_device("call-point-1", body=CALL_POINT_BODY)
        factory = MockFactory()
        with (
            Receiver(site.receiver_config, on_verdict=on_verdict) as receiver,
            Agent(config, pin_factory=factory) as agent,
        ):
            factory.pin(22).drive_low()  # the installer shuts the lid: tamper switch closed
            if not agent.link.wait_connected(10):
                _say("the call point could not reach the broker")
                return 1
            _say(
                f"call point {config.device.site}/{config.device.id} connected; LED shows {agent.indicator_state().value}"
            )

            _say("pressing the help button…")
            pressed = time.monotonic()
            factory.pin(17).drive_low()
            factory.pin(17).drive_high()
            acknowledged = _wait_for(lambda: agent.indicator_state() is IndicatorState.ACKNOWLEDGED, 10)
            elapsed = (time.monotonic() - pressed) * 1000
            _say(f"  device: LED shows {agent.indicator_state().value} after {elapsed:.1f} ms")

            _say("holding the silent duress button for 1 s…")
            factory.pin(27).drive_low()
            _wait_for(lambda: agent.buttons["duress"].activations > 0, 5)
            factory.pin(27).drive_high()
            _say(f"  device: LED still shows {agent.indicator_state().value} (silent)")
            _say("opening the enclosure…")
            factory.pin(22).drive_high()
            _wait_for(lambda: agent.outbox.depth() == 0 and receiver.counters["accepted"] >= 3, 10)
            if seconds:
                time.sleep(seconds)
            counters = dict(receiver.counters)
            stored = receiver.store.messages(kind="alert")
            _say("summary:")
            _say(
                f"  alerts stored at the centre: {len(stored)}; tamper events: {len(receiver.store.messages(kind='tamper'))}"
            )
            _say(f"  receiver counters: {counters}")
            _say(f"  device outbox depth: {agent.outbox.depth()}; help button acknowledged: {acknowledged}")
            return 0 if acknowledged and len(stored) >= 2 else 1
