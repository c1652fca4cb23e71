"""Keeps the vision process alive without ever letting it touch the button path.

Lives in the agent process and imports no numpy, OpenCV or interpreter: the
vision process is started with ``spawn``. Its start-up (imports, model load
and check) has ``startup_timeout_s`` to end in a first heartbeat; from then
on, if the process dies or stops sending heartbeats for ``stall_s``, it is
killed and restarted with a capped exponential backoff. Each distinct failure
is reported once (``on_fault``), and once more when the pipeline is healthy again.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config.device import AgentConfig
from agent.runtime.backoff import Backoff
from agent.runtime.guard import LoopGuard

log = logging.getLogger(__name__)

HEALTHY_AFTER_S = 10.0
#: First wait before a failed vision process is started again; doubles up to ``vision.restart_max_s``.
RESTART_FIRST_S = 1.0


class VisionSupervisor:
    """Starts, watches and restarts the vision process.

    Args:
        config: the device configuration (must have a ``[camera]`` section).
        on_message: called with ``(kind, body)`` for every rule event.
        on_fault: called with ``(component, text, recovered)`` once per failure and once per recovery.
        worker: the vision process's entry point, ``run_vision`` unless a test starts a slow or silent one.

    Raises ConfigError when the camera's password file cannot be read.
    """

    def __init__(
        self,
        config: AgentConfig,
        on_message: Callable[[str, dict], None],
        on_fault: Callable[[str, str, bool], None],
        worker: Callable[..., None] | None = None,
    ):
        vision = config.vision_config()
        if vision is None:
            raise ValueError("VisionSupervisor needs a device with a [camera] section")
        # The camera password is read here, in the agent, so a missing file stops the start with a clear error;
        # it reaches the vision process through the spawn pipe, never its command line or the config JSON.
        self._password = config.camera_login().get("password")
        self._args = (vision.model_dump_json(), str(config.model_dir), str(config.evidence_dir))
        self._worker = worker
        self.settings = vision.vision
        self.on_message = on_message
        self.on_fault = on_fault
        self.stats: dict[str, Any] = {}
        self.state = "starting"
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._queue = None
        self._stop = self._context.Event()
        self._closing = threading.Event()
        self._open_faults: dict[str, str] = {}
        # Beats at least every restart_max_s: waiting out a restart backoff is not being stuck.
        self.guard = LoopGuard("vision-supervisor", stall_s=self.settings.restart_max_s + 10.0)

    def __enter__(self) -> VisionSupervisor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The vision process's id while it runs."""
        process = self._process
        return None if process is None else process.pid

    def start(self) -> None:
        self.guard.start(self._supervise)

    def close(self) -> None:
        self._closing.set()
        self._stop.set()
        self.guard.join(timeout=10)
        self._end_process()

    def _spawn(self) -> None:
        from agent.vision.worker import run_vision

        self._queue = self._context.Queue()
        self._stop = self._context.Event()
        self._process = self._context.Process(
            target=self._worker or run_vision,
            args=(*self._args, self._queue, self._stop, self._password),
            name="edge-agent-vision",
            daemon=True,
        )
        self._process.start()
        self._started_at = time.monotonic()
        self._last_beat: float | None = None  # the stall timer starts at the first heartbeat

    def _end_process(self) -> None:
        process = self._process
        if process is None:
            return
        self._stop.set()
        process.join(timeout=3)
        if process.is_alive():
            process.kill()
            process.join(timeout=3)
        self._process = None

    def _supervise(self) -> None:
        restart = Backoff(RESTART_FIRST_S, self.settings.restart_max_s)
        while not self._closing.is_set():
            self.guard.beat()
            outcome = "supervisor error"
            with self.guard.step("run vision process"):  # a surprise here restarts the process, never ends us
                self._spawn()
                self.state = "running"
                outcome = self._watch()
            self._end_process()
            if outcome == "ended" or self._closing.is_set():
                self.state = "ended" if outcome == "ended" else "stopped"
                return
            self.restarts += 1
            if time.monotonic() - self._started_at > HEALTHY_AFTER_S * 3:
                restart.reset()  # it ran well for a while: this is a new failure, not the same one again
            delay = restart.next()
            self.state = f"restarting in {delay:.0f} s"
            log.warning("vision process: %s; restarting in %.0f s", outcome, delay)
            if self._closing.wait(delay):
                return

    def _watch(self) -> str:
        """Relay the process's reports until it ends, stalls or dies; returns why it stopped."""
        while not self._closing.is_set():
            try:
                item = self._queue.get(timeout=0.25)
            except queue.Empty:
                item = None
            except (EOFError, OSError):
                item = None
            now = time.monotonic()
            self.guard.beat()
            outcome = None
            if item is not None:
                with self.guard.step(f"report {item[0] if isinstance(item, tuple) and item else '?'}"):
                    outcome = self._handle(item, now)
            if outcome is not None:
                return outcome
            outcome = self._overdue(now)
            if outcome is not None:
                return outcome
            if self._process is not None and not self._process.is_alive() and self._queue.empty():
                self._fault("vision", f"vision process exited with code {self._process.exitcode}")
                return "exited"
        return "closing"

    def _overdue(self, now: float) -> str | None:
        """Start-up gets ``startup_timeout_s`` to the first heartbeat; after that, silence beyond ``stall_s`` is a stall."""
        settings = self.settings
        if self._last_beat is None:
            if now - self._started_at <= settings.startup_timeout_s:
                return None
            self._fault("vision", f"vision process did not start within {settings.startup_timeout_s:g} s")
            return "did not start"
        if now - self._last_beat <= settings.stall_s:
            return None
        self._fault("vision", f"vision pipeline stalled (no progress for {settings.stall_s:g} s)")
        return "stalled"

    def _handle(self, item: tuple, now: float) -> str | None:
        match item:
            case ("heartbeat", stats):
                self._last_beat = now
                self.stats = stats
                if now - self._started_at > HEALTHY_AFTER_S:
                    for component in ("vision", "detector"):
                        self._recover(component, "vision pipeline running again")
            case ("message", message):
                self._last_beat = now
                self.on_message(message["kind"], message["body"])
            case ("fault", component, text):
                self._fault(component, text)
            case ("recovered", component, text):
                self._recover(component, text)
            case ("fatal", component, text):
                self._fault(component, text)
                return "fatal: " + text
            case ("ended", component, text):
                log.info("%s", text)
                return "ended"
        return None

    def _fault(self, component: str, text: str) -> None:
        if self._open_faults.get(component) == text:
            return  # reported already; not again on every retry
        self._open_faults[component] = text
        log.error("%s fault: %s", component, text)
        self.on_fault(component, text, False)

    def _recover(self, component: str, text: str) -> None:
        if self._open_faults.pop(component, None) is not None:
            log.info("%s recovered: %s", component, text)
            self.on_fault(component, text, True)
