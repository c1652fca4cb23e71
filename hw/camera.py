"""The camera interface: a source of RGB frames with monotonic timestamps.

Backends (``camera_opencv``, ``camera_picamera2``) import their vendor library
lazily, inside the backend, so this module imports anywhere without numpy,
OpenCV or libcamera.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

# scheme://userinfo@ — userinfo runs to the last "@" before the host part ends ("/", "?", "#", space).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>(?:[^\s/?#@]*@)*[^\s/?#@]*)@")


class CameraUnavailable(OSError):
    """The camera cannot be opened or has stopped delivering frames."""


@dataclass
class Frame:
    """One picture: ``rgb`` (H×W×3 uint8) for detection, ``full`` for crops and evidence.

    ``full`` is the same array as ``rgb`` unless the backend has a separate
    full-resolution stream (picamera2's main vs lores). ``raw`` is a thermal
    camera's 16-bit frame (H×W uint16) as it came, so its temperatures are kept.
    """

    rgb: Any
    timestamp: float
    index: int
    full: Any = None
    raw: Any = None

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


def redact_url(text: str) -> str:
    """``text`` with the password of every URL in it replaced: ``rtsp://user:pw@host`` → ``rtsp://user:***@host``.

    For anything that may be shown: logs, exceptions, status and signed fault events.
    """

    def hide(match: re.Match) -> str:
        user, has_password, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:***@" if has_password else match[0]

    return _USERINFO.sub(hide, text)


def url_with_login(url: str, username: str | None, password: str | None) -> str:
    """``url`` with ``username`` and ``password`` (percent-encoded) in its authority, for opening only."""
    if username is None:
        return url
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"camera source {redact_url(url)}: a user name needs an rtsp:// or http:// URL")
    if "@" in parts.netloc:
        raise ValueError(f"camera source {redact_url(url)} already carries a login")
    login = quote(username, safe="") + ("" if password is None else ":" + quote(password, safe=""))
    return parts._replace(netloc=f"{login}@{parts.netloc}").geturl()


def backend_for(source: str) -> tuple[str, str | None]:
    """The backend ``open_camera`` picks for ``source``, and why it cannot work on this box (None: it can).

    Only looks for the library (picamera2 patches libcamera when imported), so an installer can run it anywhere.
    """
    from importlib.util import find_spec

    if source == "picamera2" or source.startswith("picamera2:"):
        if find_spec("picamera2") is None:
            return "picamera2", (
                "python3-picamera2 is not installed (it exists only on Raspberry Pi OS: sudo apt install "
                "python3-picamera2); elsewhere use a USB camera (/dev/video0) or an IP camera's URL (OpenCV backend)"
            )
        return "picamera2", None
    if find_spec("cv2") is None:
        return "opencv", "OpenCV is not installed (install-pi.sh --kind camera-box installs it)"
    return "opencv", None


def open_camera(source: str, **options: Any) -> Camera:
    """Pick the backend for a source: ``picamera2[:N]``, a V4L2 index or device, an URL or a file.

    ``username``/``password`` options are for URL cameras; the password comes from a secret file,
    never from the source, and is put into the URL only when the stream is opened.
    """
    if source == "picamera2" or source.startswith("picamera2:"):
        from .camera_picamera2 import Picamera2Camera

        index = int(source.split(":", 1)[1]) if ":" in source else 0
        return Picamera2Camera(index, **options)
    from .camera_opencv import OpenCVCamera

    return OpenCVCamera(source, **options)
