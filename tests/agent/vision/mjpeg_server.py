"""A real network camera for tests: vtest.avi served as an MJPEG-over-HTTP stream (what many IP cameras speak).

The server runs in its own process, as a camera is its own device (and so that OpenCV's blocking
open in the test process cannot starve it).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.conftest import REPO


def serve(port: int, video: str, fps: float) -> None:
    import cv2

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path != "/stream.mjpg":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            capture = cv2.VideoCapture(video)
            try:
                while True:
                    ok, image = capture.read()
                    if not ok:
                        capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                        continue
                    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
                    self.wfile.write(
                        b"--frame\r\nContent-Type: image/jpeg\r\n"
                        + f"Content-Length: {len(jpeg)}\r\n\r\n".encode()
                        + jpeg
                        + b"\r\n"
                    )
                    time.sleep(1 / fps)
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                capture.release()

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


class MjpegCamera:
    """``/stream.mjpg`` on a free loopback port; ``stop()``/``start()`` keep the port (a camera rebooting)."""

    def __init__(self, video, fps: float = 10.0):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.video, self.fps = str(video), fps
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        code = f"from tests.agent.vision.mjpeg_server import serve; serve({self.port}, {self.video!r}, {self.fps})"
        self._process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the test camera did not start")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
