"""Retained pushes from the centre (configurations, update manifests), worked through on one guarded thread.

paho's thread only queues; the work (verifying, waiting for alerts, health gates) runs on the
worker's own thread. A full queue drops the oldest payload: a newer push supersedes it anyway.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from agent.runtime.guard import LoopGuard


class PushInbox:
    """A bounded, newest-wins queue of signed payloads and the stop signal of the thread that serves it."""

    def __init__(self, guard: LoopGuard, maxsize: int):
        self.guard = guard
        self.stopping = threading.Event()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=maxsize)

    def submit(self, payload: bytes | None) -> None:
        """From paho's thread: queue only; a full queue drops the oldest."""
        while True:
            try:
                self._queue.put_nowait(payload)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass

    def close(self) -> None:
        self.stopping.set()
        self.submit(None)  # the stop sentinel
        self.guard.join(timeout=5)

    def serve(self, handle: Callable[[bytes], None], what: str, after: Callable[[], None] = lambda: None) -> None:
        """Hand each payload to ``handle`` (then call ``after``, however it went) until closed.

        A failure costs that payload, never the loop.
        """
        while not self.stopping.is_set():
            self.guard.beat()
            try:
                payload = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if payload is None:
                return
            with self.guard.step(what):
                try:
                    handle(payload)
                finally:
                    after()
