"""Small pieces every command shares: JSON output and stopping on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import logging
import signal
from typing import Any

log = logging.getLogger("edge-agent")


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def stop_on_signals(stop) -> None:
    def handler(signum, frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
