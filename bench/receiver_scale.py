"""Messages a second the centre verifies and stores, with few and with many enrolled devices.

    python bench/receiver_scale.py [--devices 10 5000] [--messages 400]

Two figures per fleet size: ``checker`` is MessageChecker.check one message at a time (no MQTT);
``receiver`` is a real Receiver behind a real mosquitto, fed pre-signed alerts as fast as the broker
hands them over, timed until every one is stored and acknowledged at the broker.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

from joserfc.jwk import OKPKey

from agent.centre.receiver import MessageChecker, Receiver
from agent.centre.store import ReceiverStore
from agent.demo.broker import LocalBroker
from agent.demo.site import LocalSite
from agent.mqtt.link import MqttLink
from agent.protocol.enrolment import enrolment_record
from agent.protocol.messages import TopicLayout, new_claims
from agent.protocol.signing import MessageSigner

SENDERS = 10


def enrol_fleet(site: LocalSite, devices: int) -> list[OKPKey]:
    """Enrol ``devices`` devices; return the keys of the first SENDERS (the ones that will speak)."""
    keys = []
    for n in range(devices):
        key = OKPKey.generate_key("Ed25519")
        site.keyring.enroll(enrolment_record(f"dev-{n}", site.site, "call-point", key))
        if n < SENDERS:
            keys.append(key)
    return keys


def signed_alerts(site: LocalSite, keys: list[OKPKey], messages: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(messages):
        n = i % len(keys)
        claims = new_claims(
            device=f"dev-{n}", site=site.site, seq=i // len(keys) + 1, kind="alert", body={"button": "b"}
        )
        out.append((f"{site.prefix}/{site.site}/dev-{n}/alert", MessageSigner(keys[n]).sign(claims).encode()))
    return out


def checker_rate(site: LocalSite, alerts: list[tuple[str, bytes]]) -> float:
    with ReceiverStore(site.root / f"checker-{time.monotonic_ns()}.sqlite") as store:
        checker = MessageChecker(site.keyring.__class__(site.keyring.directory), store, TopicLayout(site.prefix))
        checker.keyring.lookup("warm-up")
        start = time.perf_counter()
        verdicts = [checker.check(topic, payload) for topic, payload in alerts]
        elapsed = time.perf_counter() - start
    assert all(v.outcome == "accepted" for v in verdicts), {v.reason for v in verdicts}
    return len(alerts) / elapsed


def receiver_rate(site: LocalSite, alerts: list[tuple[str, bytes]]) -> float:
    done = threading.Event()
    accepted = []

    def on_verdict(verdict):
        accepted.append(verdict.outcome)
        if len(accepted) == len(alerts):
            done.set()

    with Receiver(site.receiver_config, on_verdict=on_verdict) as receiver:
        assert receiver.link.wait_subscribed(10)
        sender = MqttLink(
            site.receiver_config.mqtt.model_copy(update={"client_id": "bench-sender"}),
            client_id="bench-sender",
            secret_dirs=site.receiver_config.secret_dirs,
        )
        sender.start()
        assert sender.wait_connected(10)
        start = time.perf_counter()
        for topic, payload in alerts:
            sender.publish(topic, payload, qos=1)
        assert done.wait(120), f"only {len(accepted)} of {len(alerts)} verdicts"
        elapsed = time.perf_counter() - start
        sender.close()
    assert accepted.count("accepted") == len(alerts), set(accepted)
    return len(alerts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 5000])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--dir", default=None, help="where the databases go (a real disk: commits cost fsyncs)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    for devices in args.devices:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp, LocalBroker(workdir=Path(tmp) / "mosquitto") as broker:
            site = LocalSite(Path(tmp) / "site", broker)
            keys = enrol_fleet(site, devices)
            checker = checker_rate(site, signed_alerts(site, keys, args.messages))
            receiver = receiver_rate(site, signed_alerts(site, keys, args.messages))
            print(f"{devices:6d} devices: checker {checker:7.1f} msgs/s, receiver {receiver:7.1f} msgs/s", flush=True)


if __name__ == "__main__":
    main()
