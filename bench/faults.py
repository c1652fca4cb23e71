"""Fault soak: a stream of alerts through a whole site while its parts are killed, starved and misled.

Every part runs as a real process on the product's default settings (see
``tests/faultlab.py``): mosquitto, the receiver (``edge-agent receiver``), call
points (``edge-agent run --mock-pins``), alerts raised through each agent's
control socket. Per fault kind it counts what was accepted, stored, lost,
duplicated and stored out of order, and the press → stored latency; then it
commits a backlog while the broker is down and times how long the centre takes
to store all of it once the broker is back. Prints one JSON object.

    .venv/bin/python bench/faults.py --alerts 600 --rate 20 --kills 3 --backlog 10000

The tmpfs for the centre's full disk needs root (skipped otherwise), the wrong
device clock needs libfaketime (``apt-get install faketime``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the lab lives in tests/, next to the code it runs

from tests import faultplans  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alerts", type=int, default=600, help="alerts attempted per fault kind (default 600)")
    parser.add_argument("--rate", type=float, default=20.0, help="alerts per second, over two devices (default 20)")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs of the agent, broker, receiver (default 3)")
    parser.add_argument("--backlog", type=int, default=10_000, help="alerts committed while the broker is down")
    parser.add_argument("--backlog-devices", type=int, default=4, help="devices sharing the backlog (default 4)")
    parser.add_argument("--full-s", type=float, default=5.0, help="how long the centre's disk stays full")
    parser.add_argument("--ack-retry-s", type=float, help="devices' [outbox] ack_retry_s (default: the product's)")
    parser.add_argument(
        "--reconnect-max-s", type=float, help="devices' [mqtt] reconnect_max_s (default: the product's)"
    )
    parser.add_argument("--session-expiry-s", type=int, help="receivers' session_expiry_s (default: the product's)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", help="comma-separated plans: agent,broker,receiver,lost,storage,clock,backlog")
    parser.add_argument("--workdir", type=Path, help="keep every site, log and database here (default: temporary)")
    return parser.parse_args(argv)


def plans(args: argparse.Namespace) -> dict:
    """Each plan: name → callable(root) returning reports (or, for the backlog, seconds and a report)."""
    stream = {"alerts": args.alerts, "rate": args.rate, **settings(args)}
    return {
        "agent": lambda root: faultplans.agent_kills(root, **stream, kills=args.kills, seed=args.seed),
        "broker": lambda root: faultplans.broker_kills(root, **stream, kills=args.kills, seed=args.seed),
        "receiver": lambda root: faultplans.receiver_kills(root, **stream, kills=args.kills, seed=args.seed),
        "lost": lambda root: faultplans.receiver_lost(root, **stream, seed=args.seed),
        "storage": lambda root: faultplans.centre_storage_full(root, **stream, full_s=args.full_s),
        "clock": lambda root: faultplans.device_clock_off(root, offsets=(300, -300), presses=10, **settings(args)),
        "backlog": lambda root: faultplans.backlog(
            root, alerts=args.backlog, devices=args.backlog_devices, **settings(args)
        ),
    }


def settings(args: argparse.Namespace) -> dict[str, str]:
    """Config lines that replace the product's defaults, when asked for."""
    chosen = {}
    if args.session_expiry_s is not None:
        chosen["receiver_settings"] = f"session_expiry_s = {args.session_expiry_s}\n"
    if args.ack_retry_s is not None:
        chosen["outbox_settings"] = f"ack_retry_s = {args.ack_retry_s}\n"
    if args.reconnect_max_s is not None:
        chosen["mqtt_settings"] = f"reconnect_max_s = {args.reconnect_max_s}\n"
    return chosen


def settings_used(args) -> dict:
    """The timers the sites ran with: what was given on the command line, else the product's defaults."""
    from agent.config.centre import ReceiverSection
    from agent.config.device import OutboxSection
    from agent.config.mqtt import MqttSection

    mqtt, outbox, receiver = MqttSection.model_fields, OutboxSection.model_fields, ReceiverSection.model_fields
    reconnect_max = args.reconnect_max_s if args.reconnect_max_s is not None else mqtt["reconnect_max_s"].default
    ack_retry = args.ack_retry_s if args.ack_retry_s is not None else outbox["ack_retry_s"].default
    expiry = args.session_expiry_s if args.session_expiry_s is not None else receiver["session_expiry_s"].default
    return {
        "devices": f"reconnect {mqtt['reconnect_min_s'].default:g} s doubling to {reconnect_max:g} s (jittered x0.5-1), "
        f"ack timeout learned, 2 s ... ack_retry_s {ack_retry:g} s",
        "receiver": f"max_inflight {receiver['max_inflight'].default}, session_expiry_s {expiry}",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = args.only.split(",") if args.only else list(plans(args))
    result: dict = {"faults": {}, "skipped": {}, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="edge-faults-") as scratch:
        workdir = args.workdir or Path(scratch)
        for name in chosen:
            started = time.monotonic()
            try:
                outcome = plans(args)[name](workdir / name)
            except faultplans.FaultUnavailable as exc:
                result["skipped"][name] = str(exc)
                continue
            result["seconds"][name] = round(time.monotonic() - started, 1)
            if name == "backlog":
                stored_s, report = outcome
                result[f"backlog_{args.backlog}_stored_s"] = stored_s
                outcome = report
            for report in outcome if isinstance(outcome, list) else [outcome]:
                result["faults"][report.fault] = report.as_dict()
            print(f"{name}: done in {result['seconds'][name]} s", file=sys.stderr)
    result["settings"] = settings_used(args)
    result["settings"].update(
        {
            "agent_and_receiver_restart_s": 2.0,
            "broker_down_s": 1.0,
            "alerts_per_fault": args.alerts,
            "rate_per_s": args.rate,
            "kills": args.kills,
        }
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
