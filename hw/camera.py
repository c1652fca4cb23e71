"""The camera interface: a source of RGB frames with monotonic timestamps.

Backends (``camera_opencv``, ``camera_picamera2``) import their vendor library
lazily, inside the backend, so this module imports anywhere without numpy,
OpenCV or libcamera.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any


class CameraUnavailable(OSError):
    """The camera cannot be opened or has stopped delivering frames."""


@dataclass
class Frame:
    """One picture: ``rgb`` (H×W×3 uint8) for detection, ``full`` for crops and evidence.

    ``full`` is the same array as ``rgb`` unless the backend has a separate
    full-resolution stream (picamera2's main vs lores).
    """

    rgb: Any
    timestamp: float
    index: int
    full: Any = None

    def __post_init__(self) -> None:
        if self.full is None:
            self.full = self.rgb


class Camera(abc.ABC):
    """A frame source. ``read()`` returns None at the end of a file; raises CameraUnavailable when lost."""

    name: str = "camera"

    def __enter__(self) -> Camera:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abc.abstractmethod
    def open(self) -> None:
        """Open the device or stream; raises CameraUnavailable naming the source."""

    @abc.abstractmethod
    def read(self) -> Frame | None:
        """The next frame, or None when a finite source (a file) has ended."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    def fps(self) -> float | None:
        """Nominal frame rate, if the source declares one."""
        return None


def open_camera(source: str, **options: Any) -> Camera:
    """Pick the backend for a source: ``picamera2[:N]``, a V4L2 index or device, an URL or a file."""
    if source == "picamera2" or source.startswith("picamera2:"):
        from .camera_picamera2 import Picamera2Camera

        index = int(source.split(":", 1)[1]) if ":" in source else 0
        return Picamera2Camera(index, **options)
    from .camera_opencv import OpenCVCamera

    return OpenCVCamera(source, **options)
