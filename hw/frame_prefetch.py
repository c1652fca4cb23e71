"""Read frames on a thread of their own, so decoding overlaps inference.

For live cameras it also keeps only the newest frames (``depth``), so a slow
consumer sees the present rather than a growing backlog; for files nothing is
dropped (the reader waits for room).
"""

from __future__ import annotations

import queue
import threading

from .camera import Camera, Frame

_END = object()


def put_unless_stopped(target: queue.Queue, item, stop: threading.Event, drop_oldest: bool = False) -> bool:
    """Put ``item`` on a bounded queue, waiting for room but never past ``stop``.

    With ``drop_oldest`` a full queue loses its oldest entry instead (live cameras: the present
    matters, not a backlog). Returns False if stopped first.
    """
    while not stop.is_set():
        try:
            target.put(item, timeout=0.2)
            return True
        except queue.Full:
            if drop_oldest:
                try:
                    target.get_nowait()
                except queue.Empty:
                    pass
    return False


class FramePrefetcher:
    """Wraps an open camera; ``read()`` behaves like the camera's, errors included."""

    def __init__(self, camera: Camera, depth: int = 2, drop_old: bool = False):
        self.camera = camera
        self.drop_old = drop_old
        self._frames: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="frame-reader", daemon=True)
        self._thread.start()

    def _put(self, item) -> None:
        put_unless_stopped(self._frames, item, self._stop, drop_oldest=self.drop_old)

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self.camera.read()
                self._put(_END if frame is None else frame)
                if frame is None:
                    return
        except Exception as exc:  # handed to the consumer, raised there
            self._put(exc)

    def read(self, timeout: float | None = None) -> Frame | None:
        item = self._frames.get(timeout=timeout)
        if item is _END:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
