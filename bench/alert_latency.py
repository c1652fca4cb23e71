"""Alert latency: button press → broker PUBACK → centre ack shown on the device.

Runs a real mosquitto on loopback, the reference receiver and one call point on
gpiozero's mock pins, presses the button N times, and in the same run measures
the floor: a bare paho QoS 1 publish → PUBACK of the same payload size on the
same broker. Prints one JSON object.

    python bench/alert_latency.py --presses 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from gpiozero.pins.mock import MockFactory

from agent.centre.receiver import Receiver
from agent.demo.broker import LocalBroker
from agent.demo.site import LocalSite
from agent.device.agent import Agent

BUTTON_PIN = 17


def summary(values_s: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values_s)
    if not ms:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": round(statistics.median(ms), 3),
        "p99": round(ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))], 3),
        "max": round(ms[-1], 3),
    }


def measure_alert_path(broker: LocalBroker, root: Path, presses: int) -> tuple[dict, int]:
    """Press, wait for the centre's ack, repeat: one alert in flight at a time."""
    site = LocalSite(root, broker)
    config = site.add_device("bench-cp", outbox="capacity = 20000\n")
    factory = MockFactory()
    press = {"at": 0.0, "claims": None}
    puback_s: list[float] = []
    ack_s: list[float] = []
    acknowledged = threading.Semaphore(0)

    def on_published(entry, at):
        if entry.kind == "alert":
            puback_s.append(at - press["at"])

    def on_acknowledged(entry, at):
        if entry.kind == "alert":
            ack_s.append(at - press["at"])
            press["claims"] = entry.claims
            acknowledged.release()

    with (
        Receiver(site.receiver_config),
        Agent(config, pin_factory=factory, on_published=on_published, on_acknowledged=on_acknowledged) as agent,
    ):
        agent.link.wait_connected(10)
        time.sleep(0.5)
        pin = factory.pin(BUTTON_PIN)
        for _ in range(presses):
            press["at"] = time.monotonic()
            pin.drive_low()
            pin.drive_high()
            if not acknowledged.acquire(timeout=10):
                raise RuntimeError("an alert was not acknowledged within 10 s")
            time.sleep(0.04)  # beyond the 30 ms bounce lockout before the next press
        payload_size = len(agent.signer.sign(press["claims"]))
    return {"press_to_puback_ms": summary(puback_s), "press_to_ack_ms": summary(ack_s)}, payload_size


def measure_floor(broker: LocalBroker, payload_size: int, count: int) -> dict:
    client = paho.Client(callback_api_version=paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    acked: dict[int, float] = {}
    event = threading.Event()

    def on_publish(client, userdata, mid, reason_code, properties):
        acked[mid] = time.monotonic()
        event.set()

    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    client.loop_start()
    time.sleep(0.2)
    payload = b"x" * payload_size
    durations = []
    for _ in range(count):
        event.clear()
        t0 = time.monotonic()
        info = client.publish("bench/floor", payload, qos=1)
        event.wait(5)
        durations.append(acked[info.mid] - t0)
        time.sleep(0.002)
    client.disconnect()
    client.loop_stop()
    return summary(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="edge-bench-") as root:
        result, payload_size = measure_alert_path(broker, Path(root), args.presses)
        floor = measure_floor(broker, payload_size, args.presses)
    print(
        json.dumps(
            {
                "presses": args.presses,
                **result,
                "floor_publish_to_puback_ms": floor,
                "payload_bytes": payload_size,
                "targets_ms": {"press_to_puback_p99": 5, "press_to_ack_p99": 20},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
