"""DC-09 forwarding: events per second to an ARC, and the latency from the centre's store to the ARC's ACK.

The ARC is pysiaalarm's DC-09 receiver (AES-128) on loopback; the forwarding outbox is a real
receiver store (SQLite, WAL, full sync). Three figures:

- ``backlog``: N events queued at once (a receiver catching up after an ARC outage), time until
  the last ACK: events per second through store → frame → ARC → ACK → marked delivered.
- ``live``: events queued one at a time at a steady rate; for each, queued (committed) → marked
  delivered after the ARC's ACK.
- ``floor``: the same frame sent straight to pysiaalarm and its ACK read, no store: the part of the
  latency that is the ARC's and the loopback's.

    python bench/dc09_forward.py --backlog 2000 --live 200
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pysiaalarm import SIAAccount, SIAClient

from agent.centre.dc09 import FrameReader, Route, build_message, contact_id, parse_reply
from agent.centre.forward_queue import Forward
from agent.centre.forwarding import Forwarding
from agent.centre.store import ReceiverStore
from agent.config.centre import load_receiver_config

KEY_TEXT = "0123456789ABCDEF"  # pysiaalarm uses the key text's ASCII bytes


def percentiles(values_s: list[float]) -> dict[str, float | None]:
    ms = sorted(v * 1000 for v in values_s)
    if not ms:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": round(statistics.median(ms), 2),
        "p99": round(ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], 2),
        "max": round(ms[-1], 2),
    }


def config_for(root: Path, port: int):
    (root / "credentials").mkdir()
    (root / "credentials" / "arc.key").write_text(KEY_TEXT.encode().hex())
    path = root / "receiver.toml"
    path.write_text(
        '[receiver]\nstate_dir = "."\ncredentials_dir = "credentials"\n[mqtt]\nhost = "127.0.0.1"\n'
        f'[[forward.arc]]\nname = "bench"\nprimary = "127.0.0.1:{port}"\nkey_file = "arc.key"\n'
        'default_account = "1234"\nnull_interval_s = 3600\n'
    )
    return load_receiver_config(path)


def queue(forwarding: Forwarding, store: ReceiverStore, first: int, count: int) -> None:
    with store.transaction():
        forwarding.queue.enqueue(
            [
                Forward("bench", f"b:{n}", "1234", "ADM-CID", contact_id(1, 120, 1, n % 999 + 1), f"event {n}")
                for n in range(first, first + count)
            ],
            time.time(),
        )
    forwarding.forwarders[0].wake()


def wait_delivered(forwarding: Forwarding, total: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if forwarding.queue.status()[0].depth == 0 and len(forwarding.queue.rows("bench")) >= total:
            return True
        time.sleep(0.02)  # not faster: each look takes the store's lock from the forwarder
    return False


def floor(port: int, count: int) -> list[float]:
    """Frame → pysiaalarm → ACK with no store in the way."""
    times, reader = [], FrameReader()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for n in range(count):
            frame = build_message(
                "ADM-CID",
                n % 9999 + 1,
                Route("0", "0", "1234"),
                contact_id(1, 120, 1, 1),
                time.time(),
                KEY_TEXT.encode(),
            )
            start = time.perf_counter()
            sock.sendall(frame)
            frames: list[bytes] = []
            while not frames:
                frames = reader.feed(sock.recv(4096))
            parse_reply(frames[0], KEY_TEXT.encode())
            times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--live", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="live events per second")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    arc = SIAClient("127.0.0.1", 0, [SIAAccount("1234", KEY_TEXT)], lambda event: None)
    port = arc.sia_server.server_address[1]
    arc.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            with ReceiverStore(root / "receiver.sqlite") as store:
                forwarding = Forwarding(config_for(root, port), store)
                forwarding.start()
                try:
                    start = time.perf_counter()
                    queue(forwarding, store, 0, args.backlog)
                    assert wait_delivered(forwarding, args.backlog, 600), "backlog not delivered"
                    backlog_s = time.perf_counter() - start
                    for n in range(args.live):
                        queue(forwarding, store, args.backlog + n, 1)
                        time.sleep(1 / args.rate)
                    assert wait_delivered(forwarding, args.backlog + args.live, 60), "live events not delivered"
                    rows = forwarding.queue.store.run_all(
                        [("SELECT queued_at, delivered_at FROM forward_queue ORDER BY id", ())]
                    )[0][args.backlog :]
                finally:
                    forwarding.close()
        floor_s = floor(port, args.live)
    finally:
        arc.stop()
    print(
        json.dumps(
            {
                "arc": "pysiaalarm (DC-09 TCP, ADM-CID, AES-128) on loopback; store: SQLite WAL, synchronous=FULL",
                "backlog_events": args.backlog,
                "backlog_events_per_s": round(args.backlog / backlog_s, 1),
                "live_events": args.live,
                "live_rate_per_s": args.rate,
                "store_to_arc_ack_ms": percentiles([delivered - queued for queued, delivered in rows]),
                "floor_frame_to_ack_ms": percentiles(floor_s),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
