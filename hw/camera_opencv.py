"""OpenCV camera backend: USB/UVC (including thermal UVC), RTSP/HTTP IP cameras and video files.

Wiring note: UVC cameras appear as ``/dev/videoN`` (give the path or the
index N); IP cameras by URL (``rtsp://host/stream``, the login given apart as
``username``/``password``); files by path. The URL is shown only with its
password replaced by ``***``.
Thermal UVC cameras that deliver one 8- or 16-bit channel are converted to
three-channel 8-bit RGB (16-bit is stretched to the frame's own range); with
``y16=True`` the camera is asked for Y16 unconverted and each 16-bit frame is
also kept as it came (``Frame.raw``: radiometric cameras give temperatures).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .camera import Camera, CameraUnavailable, Frame, redact_url, url_with_login

_STREAM_PREFIXES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://")


class OpenCVCamera(Camera):
    """Frames from ``cv2.VideoCapture``.

    Args:
        source: device index ("0"), device path, stream URL or file path.
        width, height, fps: requested capture settings for devices (ignored for files).
        realtime: pace a file at its own frame rate, as a live camera would deliver it.
        loop: restart a file at its end instead of ending.
        rtsp_transport: "tcp" (default, interleaved) or "udp" for RTSP cameras.
        username, password: login of an RTSP/HTTP camera, put into the URL only when opening.
    """

    def __init__(
        self,
        source: str | int,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
        realtime: bool = False,
        loop: bool = False,
        rtsp_transport: str = "tcp",
        username: str | None = None,
        password: str | None = None,
        y16: bool = False,
    ):
        try:
            self._target = url_with_login(str(source), username, password)
        except ValueError as exc:
            raise CameraUnavailable(str(exc)) from None
        self.source = redact_url(str(source))  # what is shown; the login stays in _target
        self.name = f"opencv:{self.source}"
        self._width, self._height, self._fps = width, height, fps
        self.realtime = realtime
        self.loop = loop
        self.rtsp_transport = rtsp_transport
        self.y16 = y16
        self._capture = None
        self._index = 0
        self._next_due = 0.0

    def __repr__(self) -> str:
        return f"<OpenCVCamera {self.source} open={self._capture is not None}>"

    @property
    def is_file(self) -> bool:
        return (
            not self.source.isdigit()
            and not self.source.startswith(_STREAM_PREFIXES)
            and not self.source.startswith("/dev/")
        )

    def open(self) -> None:
        import cv2

        if self.is_file and not Path(self._target).exists():
            raise CameraUnavailable(f"camera source {self.source}: no such file")
        target = int(self._target) if self._target.isdigit() else self._target
        if self.source.startswith(_STREAM_PREFIXES):
            if self.source.startswith(("rtsp://", "rtsps://")):
                # RTP over the RTSP TCP connection: survives NAT and firewalls that drop camera UDP.
                os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = f"rtsp_transport;{self.rtsp_transport}"
            # Bounded waits instead of FFmpeg's 30 s: a dead stream becomes a reconnect, not a stall.
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10_000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5_000]
            capture = cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
        else:
            capture = cv2.VideoCapture(target)
        if not capture.isOpened():
            capture.release()
            raise CameraUnavailable(f"camera source {self.source}: cannot be opened by OpenCV")
        if not self.is_file:
            capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # latest frame, not a stale queue
            for prop, value in (
                (cv2.CAP_PROP_FRAME_WIDTH, self._width),
                (cv2.CAP_PROP_FRAME_HEIGHT, self._height),
                (cv2.CAP_PROP_FPS, self._fps),
            ):
                if value:
                    capture.set(prop, value)
            if self.y16:
                capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"Y16 "))
        if self.y16:  # 16-bit counts as the camera (or a lossless GRAY16 recording) has them, not 8-bit
            capture.set(cv2.CAP_PROP_CONVERT_RGB, 0)
        self._capture = capture
        self._next_due = time.monotonic()

    @property
    def fps(self) -> float | None:
        if self._capture is None:
            return self._fps
        import cv2

        value = self._capture.get(cv2.CAP_PROP_FPS)
        return value if value and value > 0 else self._fps

    def read(self) -> Frame | None:
        import cv2

        if self._capture is None:
            raise CameraUnavailable(f"camera source {self.source} is not open")
        ok, image = self._capture.read()
        if not ok and self.is_file and self.loop:
            self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._capture.read()
        if not ok:
            if self.is_file:
                return None
            raise CameraUnavailable(f"camera source {self.source} stopped delivering frames")
        if self.realtime and self.fps:
            self._next_due += 1.0 / self.fps
            delay = self._next_due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                self._next_due = time.monotonic()
        if self.y16:
            image = self._as_y16(image)
        rgb = to_rgb(image)
        self._index += 1
        raw = image if image.dtype.itemsize == 2 and image.ndim == 2 else None
        return Frame(rgb=rgb, timestamp=time.monotonic(), index=self._index - 1, raw=raw)

    def _as_y16(self, image):
        """Some OpenCV builds hand an unconverted Y16 frame over as its raw bytes (1×N uint8): reshape it."""
        import cv2
        import numpy as np

        if image.dtype == np.uint8 and image.ndim == 2 and image.shape[0] == 1:
            w, h = int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if w * h * 2 == image.size:
                return image.view("<u2").reshape(h, w)
        return image

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


def to_rgb(image):
    """BGR, grey or 16-bit thermal frames → H×W×3 uint8 RGB."""
    import cv2
    import numpy as np

    if image.dtype == np.uint16:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
