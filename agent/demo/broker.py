"""A throwaway mosquitto on a free loopback port, for the demo, the tests and the benchmarks.

Production devices talk to the city's broker; this exists so that everything
else runs against a real broker too, never a fake one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from agent.errors import BrokerUnavailable, MosquittoMissing

INSTALL_HINT = "install it with 'sudo apt-get install -y mosquitto' (Debian, Raspberry Pi OS, Ubuntu)"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalBroker:
    """mosquitto listening on 127.0.0.1 only (or the one ``host`` given); ``stop()`` and ``start()`` keep the same port."""

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        listener_config: str = "",
        global_config: str = "",
        host: str = "127.0.0.1",
    ):
        """``listener_config`` lines follow the listener line (e.g. TLS: cafile, certfile, keyfile);
        ``global_config`` lines precede it (e.g. ``acl_file``); ``host`` is the one address it listens on
        (tests with network namespaces give it their bridge's address)."""
        self.executable = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
        )
        if self.executable is None:
            raise MosquittoMissing(f"mosquitto is not installed; {INSTALL_HINT}")
        self.host = host
        self.port = port or free_port(host)
        self._tmp = tempfile.TemporaryDirectory(prefix="edge-mosquitto-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path.write_text(
            # No Receive Maximum announced: each client's own window governs (see agent.mqtt.link);
            # first, so that ``global_config`` may set another.
            "max_inflight_messages 0\n"
            f"{global_config}\nlistener {self.port} {self.host}\n{listener_config}\nallow_anonymous true\npersistence false\n"
            f"log_dest file {self.log_path}\nlog_type error\nlog_type warning\nmax_queued_messages 100000\n"
            "set_tcp_nodelay true\n" + ("user root\n" if os.geteuid() == 0 else "")
            # As root, mosquitto would drop to its own user and lose access to our private temp files.
        )
        self._process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<LocalBroker {self.host}:{self.port} running={self.is_running}>"

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.is_running:
            return
        self._process = subprocess.Popen(
            [self.executable, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                log = self.log_path.read_text() if self.log_path.exists() else ""
                raise BrokerUnavailable(f"mosquitto exited at start on port {self.port}: {err or log}".strip())
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"mosquitto did not listen on {self.host}:{self.port} within {timeout:g} s")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stderr:
            self._process.stderr.close()
        self._process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean goodbye to any client, everything in memory gone (fault tests)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self.stop()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
