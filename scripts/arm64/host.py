"""The host's side of ``scripts/arm64-check``: the centre on the host's loopback (the arm64 root shares the
host's network) and the reading of what the arm64 side printed.

``serve SITE``: writes a site below SITE (centre keys, an enrolled call point and building button, with
their configs and keys, exactly as ``LocalSite`` does for the demo and the tests), which the check has put
inside the arm64 root; starts mosquitto and the receiver; writes SITE/ready; runs until SIGTERM.
Every verdict goes to SITE/centre/verdicts.jsonl.

``verify SITE DEVICE SEQ``: the receiver accepted that test alert and it is in the centre's store.

``acknowledged``: the ``edge-agent status`` JSON on stdin counts an acknowledgement (exit 1 if not).

``people FILE``: ``edge-agent detect`` JSON lines: a person in every frame? prints the counts and timings.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

DEVICES = {"cp-1": "call-point", "bb-1": "building-button"}


def serve(site_dir: Path) -> int:
    from agent.centre.receiver import Receiver
    from agent.demo.broker import LocalBroker
    from agent.demo.site import LocalSite

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with LocalBroker(workdir=site_dir.parent / "mosquitto") as broker:
        site = LocalSite(site_dir, broker, site="arm64-check")
        for device, kind in DEVICES.items():
            site.add_device(device, kind=kind)
        log_path = site.centre_dir / "verdicts.jsonl"
        with log_path.open("a") as log, Receiver(site.receiver_config, on_verdict=_verdict_writer(log)) as receiver:
            if not receiver.link.wait_subscribed(30):
                print("arm64-check centre: the receiver could not subscribe to the broker", file=sys.stderr)
                return 1
            (site_dir / "ready").write_text(json.dumps({"broker": f"{broker.host}:{broker.port}"}))
            print(f"arm64-check centre: broker {broker.host}:{broker.port}, receiver subscribed", flush=True)
            stop.wait()
    return 0


def _verdict_writer(log):
    lock = threading.Lock()

    def write(verdict) -> None:
        claims = verdict.claims
        line = {
            "outcome": verdict.outcome,
            "reason": verdict.reason,
            "device": claims.device if claims else None,
            "seq": claims.seq if claims else None,
            "kind": claims.kind if claims else None,
            "test": claims.test if claims else None,
        }
        with lock:
            log.write(json.dumps(line) + "\n")
            log.flush()

    return write


def verify(site_dir: Path, device: str, seq: int) -> int:
    """Accepted (signature verified, fresh, in order) and stored: what the ack the device got stands for."""
    from agent.centre.store import ReceiverStore
    from agent.config.centre import load_receiver_config

    verdicts = [json.loads(line) for line in (site_dir / "centre/verdicts.jsonl").read_text().splitlines()]
    accepted = [v for v in verdicts if v["device"] == device and v["seq"] == seq and v["outcome"] == "accepted"]
    config = load_receiver_config(site_dir / "centre/receiver.toml")
    with ReceiverStore(config.database_path) as store:
        stored = store.find(device, seq)
    if not accepted or stored is None:
        print(f"{device} seq {seq}: accepted={bool(accepted)} stored={stored is not None}; verdicts: {verdicts}")
        return 1
    print(f"{device} seq {seq}: verified and accepted, stored as {stored.kind} (test={stored.test})")
    return 0


def acknowledged() -> int:
    """The device verified the centre's signed ack: its delivery counts it."""
    try:
        status = json.load(sys.stdin)
    except ValueError:
        return 1
    return 0 if status.get("delivery", {}).get("acknowledged", 0) >= 1 else 1


def people(path: Path) -> int:
    """A person in every processed frame of vtest.avi (the footage has people walking in all 795)."""
    frames = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    counts = [sum(d["label"] == "person" for d in f["detections"]) for f in frames]
    times = sorted(f["inference_ms"] for f in frames)
    if not frames:
        print("no frames processed")
        return 1
    runtime = frames[0]["runtime"]
    median = times[len(times) // 2]
    print(
        f"{sum(c > 0 for c in counts)}/{len(frames)} frames with people ({min(counts)}-{max(counts)} per frame), "
        f"{runtime}, median invoke {median:.0f} ms emulated"
    )
    return 0 if all(counts) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve").add_argument("site", type=Path)
    check = commands.add_parser("verify")
    check.add_argument("site", type=Path)
    check.add_argument("device")
    check.add_argument("seq", type=int)
    commands.add_parser("acknowledged")
    commands.add_parser("people").add_argument("file", type=Path)
    args = parser.parse_args()
    if args.command == "serve":
        return serve(args.site)
    if args.command == "verify":
        return verify(args.site, args.device, args.seq)
    if args.command == "acknowledged":
        return acknowledged()
    return people(args.file)


if __name__ == "__main__":
    sys.exit(main())
