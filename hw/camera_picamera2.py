"""picamera2 backend for the Raspberry Pi camera modules.

picamera2 only installs from apt on a Pi (``python3-picamera2``) and patches
libcamera at import, so it is imported here, lazily, and nowhere else. Two
streams are configured, as picamera2's own TensorFlow example does: a
low-resolution ``lores`` stream for motion and detection, and the full-size
``main`` stream for crops and evidence.

Wiring note: the camera ribbon goes to the CSI port; check it with
``rpicam-hello --list-cameras``.
"""

from __future__ import annotations

import time

from .camera import Camera, CameraUnavailable, Frame


class Picamera2Camera(Camera):
    def __init__(
        self,
        index: int = 0,
        width: int = 640,
        height: int = 480,
        fps: float | None = None,
        main_size: tuple[int, int] | None = None,
        **_ignored,
    ):
        self.index = index
        self.name = f"picamera2:{index}"
        self._lores = (width, height)
        # The full stream keeps the detection stream's aspect ratio, so normalised boxes mean the same in both.
        self._main = main_size or (width * 3, height * 3)
        self._fps = fps
        self._camera = None
        self._count = 0

    def open(self) -> None:
        try:
            from picamera2 import Picamera2  # only on a Pi
        except ImportError as exc:
            raise CameraUnavailable(
                f"picamera2 is not installed ({exc}); on Raspberry Pi OS: sudo apt install python3-picamera2 "
                "and create the venv with --system-site-packages"
            ) from None
        try:
            camera = Picamera2(self.index)
            controls = {"FrameRate": self._fps} if self._fps else {}
            config = camera.create_video_configuration(
                main={"size": self._main, "format": "RGB888"},
                lores={"size": self._lores, "format": "YUV420"},
                controls=controls,
            )
            camera.configure(config)
            camera.start()
        except Exception as exc:  # libcamera raises plain RuntimeError/IndexError
            raise CameraUnavailable(f"camera {self.name} cannot be opened: {exc}") from None
        self._camera = camera

    @property
    def fps(self) -> float | None:
        return self._fps

    def read(self) -> Frame | None:
        import cv2

        if self._camera is None:
            raise CameraUnavailable(f"camera {self.name} is not open")
        try:
            request = self._camera.capture_request()
            try:
                lores = request.make_array("lores")
                main = request.make_array("main")
            finally:
                request.release()
        except Exception as exc:
            raise CameraUnavailable(f"camera {self.name} stopped delivering frames: {exc}") from None
        rgb = cv2.cvtColor(lores, cv2.COLOR_YUV420p2RGB)
        # RGB888 in libcamera is BGR byte order in memory.
        full = cv2.cvtColor(main, cv2.COLOR_BGR2RGB)
        self._count += 1
        return Frame(rgb=rgb, timestamp=time.monotonic(), index=self._count - 1, full=full)

    def close(self) -> None:
        if self._camera is not None:
            self._camera.stop()
            self._camera.close()
            self._camera = None
