"""``edge-agent receiver forwarders``: each alarm receiving centre's forwarding state, read from the database."""

from __future__ import annotations

import argparse
import time

from agent.cli.output import print_json


def cmd_receiver_forwarders(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from agent.centre.forward_queue import ForwardQueue
    from agent.centre.store import open_store
    from agent.config.centre import load_receiver_config

    config = load_receiver_config(args.config)
    with open_store(config) as store:
        states = {s.arc: s for s in ForwardQueue(store).status()}
    now = time.time()
    rows = []
    for arc in config.forward.arc:
        state = states.get(arc.name)
        if state is None:
            rows.append([arc.name, "never started", "-", 0, "-", "-", "-", "-"])
            continue
        rows.append(
            [
                arc.name,
                state.path if state.connected else "not connected",
                arc.backup and "primary+backup" or "primary",
                state.depth,
                ago(now, state.oldest_queued_at),
                ago(now, state.last_ack_at),
                f"{ago(now, state.last_nak_at)} ({state.last_nak})" if state.last_nak_at else "-",
                state.fault or "-",
            ]
        )
    headers = ["arc", "connected", "paths", "queue", "oldest unacked", "last ACK", "last NAK", "fault"]
    if args.json:
        print_json([dict(zip(headers, row, strict=True)) for row in rows])
    else:
        print(tabulate(rows, headers=headers))
    return 0


def ago(now: float, at: float | None) -> str:
    return "-" if at is None else f"{max(0.0, now - at):.0f} s ago"
