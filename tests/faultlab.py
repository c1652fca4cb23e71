"""A fault laboratory: a whole site as real processes, alerts at a steady rate, and the centre's store as judge.

``FaultLab`` builds a site (``LocalSite`` on a ``LocalBroker``), runs receivers
(``edge-agent receiver``) and agents (``edge-agent run --mock-pins``) as real
subprocesses, and raises test alerts through each agent's control socket: the
real path, from the outbox commit on. A press counts as *accepted* only when
the control reply came back (it carries seq and event id). What the centre
stored is read from its SQLite database, and each fault is summed up as a
``FaultReport``: accepted, stored, lost, duplicated, out of order, press →
stored latency. The faults themselves (signals, a full file system, a shifted
clock) live in ``tests/faultplans.py``; the test suite and ``bench/faults.py``
both use these two modules.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.centre.store import ReceiverStore, StoredMessage, open_store
from agent.config.centre import load_receiver_config
from agent.config.device import load_agent_config
from agent.demo.broker import LocalBroker
from agent.demo.site import LocalSite
from agent.device.control import request
from agent.errors import ControlError
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parent.parent
#: Every process of the site is this command line; JSON logs carry a timestamp on every line.
CLI = [sys.executable, "-m", "agent.cli", "--log-format", "json"]
#: What LocalSite sets to make tests fast; the lab removes it so that devices and receivers run on
#: the product's defaults (reconnect 0.5 s doubling to 2 s, jittered; ack timeout learned, at most ack_retry_s 15 s).
_TEST_SPEEDUPS = ("reconnect_min_s = 0.1\n", "reconnect_max_s = 1.0\n", "ack_retry_s = 5\n")
#: The receiver's log line for a raised alert: counted to prove nothing is raised twice.
_RAISED = re.compile(r"TEST ALERT from (?P<site>[^/\s]+)/(?P<device>\S+) seq (?P<seq>\d+):")


@dataclass(frozen=True)
class Press:
    """One test alert the agent accepted (its control reply came back)."""

    device: str
    seq: int
    event_id: str
    pressed_at: float  # wall clock when the request was sent; the centre's received_at uses the same clock


@dataclass
class FaultReport:
    """What one fault did to the alerts accepted while it was going on."""

    fault: str
    attempted: int
    accepted: int
    stored: int
    lost: int
    duplicated: int
    out_of_order: int
    p50_s: float | None
    p99_s: float | None
    max_s: float | None
    notes: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "fault"}


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest): never optimistic on few samples."""
    if not values:
        return None
    ordered = sorted(values)
    rank = -(-round(fraction * 1000) * len(ordered) // 1000)  # ceil(fraction * n), without float error
    return ordered[min(len(ordered), max(1, rank)) - 1]


class Supervised:
    """One real process of the site, started again on demand; its output is kept in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env or {}
        self.starts = 0
        self._process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<Supervised {self.name} running={self.is_running} starts={self.starts}>"

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.is_running else None

    def start(self) -> None:
        if self.is_running:
            return
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1} of {self.name} at {time.time():.3f}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.argv, cwd=REPO, env={**env, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush beyond what is already committed."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, as systemd stops a unit; SIGKILL if it does not go within 10 s."""
        self._signal(signal.SIGTERM, grace_s=10.0)

    def _signal(self, signum: int, grace_s: float = 5.0) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signum)
            try:
                self._process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


class FaultLab:
    """A site with ``devices`` call points and a centre, every part a real process.

    Args:
        root: working directory (site, logs).
        devices: device ids to enrol.
        device_env: extra environment per device id (e.g. libfaketime for a wrong clock).
        receiver_settings: extra ``[receiver]`` lines (e.g. ``session_expiry_s = 10``).
        outbox_settings: extra ``[outbox]`` lines for every device.
        mqtt_settings: extra ``[mqtt]`` lines for every device (e.g. ``reconnect_max_s = 5``).
        broker_host: the one address the broker listens on (a bridge's, for receivers in network namespaces).
        receiver_prefixes: a command prefix per receiver id (e.g. ``["ip", "netns", "exec", "h1"]``).
    """

    def __init__(
        self,
        root: Path,
        devices: tuple[str, ...] = ("cp-1",),
        *,
        device_env: dict[str, dict[str, str]] | None = None,
        receiver_settings: str = "",
        outbox_settings: str = "",
        mqtt_settings: str = "",
        broker_host: str = "127.0.0.1",
        receiver_prefixes: dict[str, list[str]] | None = None,
    ):
        self.root = Path(root)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.broker = LocalBroker(workdir=self.root / "mosquitto", host=broker_host)
        self.site = LocalSite(self.root / "site", self.broker)
        self._receiver_settings = receiver_settings
        self._receiver_prefixes = receiver_prefixes or {}
        self.receivers: dict[str, Supervised] = {}
        self.agents: dict[str, Supervised] = {}
        self.sockets: dict[str, Path] = {}
        self._receiver_template = _without_speedups(self.site.receiver_toml_path().read_text())
        self._write_receiver_config("centre-1", self.site.receiver_toml_path())
        for device in devices:
            self.site.add_device(device)
            path = self.site.device_config_path(device)
            text = _without_speedups(path.read_text()).replace("[outbox]\n", f"[outbox]\n{outbox_settings}")
            path.write_text(text.replace("[mqtt]\n", f"[mqtt]\n{mqtt_settings}"))
            self.sockets[device] = load_agent_config(path).control_socket
            argv = [*CLI, "run", "--mock-pins", "--config", str(path)]
            self.agents[device] = Supervised(device, argv, self.logs / f"{device}.log", (device_env or {}).get(device))
        self.broker.start()

    def __enter__(self) -> FaultLab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for process in [*self.agents.values(), *self.receivers.values()]:
            process.stop()
        self.broker.close()

    @property
    def devices(self) -> list[str]:
        return list(self.agents)

    # The centre.

    def _write_receiver_config(self, receiver_id: str, path: Path) -> None:
        line = f'id = "{receiver_id}"\n{self._receiver_settings}'
        path.write_text(re.sub(r'^id = "[^"]*"\n', line, self._receiver_template, count=1, flags=re.M))

    def add_receiver(self, receiver_id: str) -> Supervised:
        """A receiver process sharing the centre's database, keys and MQTT share group."""
        path = self.site.centre_dir / f"{receiver_id}.toml"
        self._write_receiver_config(receiver_id, path)
        argv = [*self._receiver_prefixes.get(receiver_id, []), *CLI, "receiver", "--config", str(path)]
        receiver = Supervised(receiver_id, argv, self.logs / f"{receiver_id}.log")
        self.receivers[receiver_id] = receiver
        return receiver

    def start_receiver(self, receiver_id: str = "centre-1", timeout: float = 20.0) -> Supervised:
        """Start a receiver and wait until it has connected to the broker."""
        receiver = self.receivers.get(receiver_id) or self.add_receiver(receiver_id)
        connects = self._log_count(receiver, "connected to ")
        receiver.start()
        if not wait_until(lambda: self._log_count(receiver, "connected to ") > connects, timeout, interval=0.1):
            raise RuntimeError(f"receiver {receiver_id} did not connect within {timeout:g} s; see {receiver.log_path}")
        return receiver  # subscribed a moment later; what devices send before is "unheard" and sent again

    @staticmethod
    def _log_count(process: Supervised, text: str) -> int:
        return process.log_path.read_text(errors="replace").count(text) if process.log_path.exists() else 0

    def last_logged(self, name: str, text: str) -> float | None:
        """When a receiver or agent last logged a line containing ``text`` (its JSON log's timestamp)."""
        process = self.receivers.get(name) or self.agents[name]
        lines = process.log_path.read_text(errors="replace").splitlines() if process.log_path.exists() else []
        times = [json.loads(line)["ts"] for line in lines if text in line and line.startswith("{")]
        return max(times, default=None)

    def log_count(self, name: str, text: str) -> int:
        """How often ``text`` appears in the log of a receiver or agent (all its runs)."""
        return self._log_count(self.receivers.get(name) or self.agents[name], text)

    def store(self) -> ReceiverStore:
        """The centre's store as its receivers use it (SQLite, or PostgreSQL when receiver_settings say so)."""
        return open_store(load_receiver_config(self.site.receiver_toml_path()))

    def stored_keys(self) -> set[tuple[str, int]]:
        """(device, seq) of every stored alert: a cheap read-only poll for big backlogs."""
        config = load_receiver_config(self.site.receiver_toml_path())
        if config.database_dsn is not None:
            with self.store() as store:
                return {(m.device, m.seq) for m in store.messages(kind="alert")}
        uri = f"file:{config.database_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            return set(db.execute("SELECT device, seq FROM messages WHERE kind = 'alert'").fetchall())

    def stored_alerts(self) -> list[StoredMessage]:
        with self.store() as store:
            return store.messages(kind="alert")

    def raised(self) -> Counter[tuple[str, int]]:
        """How often each (device, seq) was raised as an alert, over every receiver's log (restarts included)."""
        counts: Counter[tuple[str, int]] = Counter()
        for receiver in self.receivers.values():
            if receiver.log_path.exists():
                for match in _RAISED.finditer(receiver.log_path.read_text(errors="replace")):
                    counts[(match["device"], int(match["seq"]))] += 1
        return counts

    # The devices.

    def start_agent(self, device: str, timeout: float = 20.0) -> None:
        """Start an agent and wait until its control socket answers and it is connected to the broker."""
        self.agents[device].start()
        if not wait_until(lambda: self.status(device).get("connected"), timeout, interval=0.05):
            raise RuntimeError(f"agent {device} not up within {timeout:g} s; see {self.agents[device].log_path}")

    def start_all(self, receivers: tuple[str, ...] = ("centre-1",)) -> None:
        for receiver_id in receivers:
            self.start_receiver(receiver_id)
        for device in self.devices:
            self.start_agent(device)

    def status(self, device: str) -> dict:
        try:
            return request(self.sockets[device], "status", timeout=2.0)
        except ControlError:
            return {}

    def press(self, device: str, timeout: float = 5.0) -> Press | None:
        """A test alert through the running agent; None when the agent did not accept it (down, killed)."""
        pressed_at = time.time()
        try:
            reply = request(self.sockets[device], "test-alert", timeout=timeout)
        except ControlError:
            return None
        return Press(device, int(reply["seq"]), str(reply["event_id"]), pressed_at)

    def warm_up(self, timeout: float = 30.0) -> None:
        """One alert per device stored: the whole path works before any fault is injected."""
        presses = [p for p in (self.press(d) for d in self.devices) if p is not None]
        if len(presses) != len(self.devices) or self.wait_stored(presses, timeout):
            raise RuntimeError(f"the site did not store a first alert from every device within {timeout:g} s")

    def wait_stored(self, presses: list[Press], timeout: float) -> list[Press]:
        """Wait until every press is stored; returns those still missing at the deadline."""
        missing = list(presses)
        deadline = time.monotonic() + timeout
        while missing:
            stored = {(m.device, m.seq, m.event_id) for m in self.stored_alerts()}
            missing = [p for p in missing if (p.device, p.seq, p.event_id) not in stored]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        return missing

    # The judge.

    def report(self, fault: str, presses: list[Press], attempted: int | None = None, **notes) -> FaultReport:
        """Compare what was accepted with what the centre stored and raised."""
        rows = self.stored_alerts()
        by_key = {(m.device, m.seq): m for m in rows}
        devices = {p.device for p in presses}
        latencies, stored, lost = [], 0, 0
        for press in presses:
            row = by_key.get((press.device, press.seq))
            if row is None or row.event_id != press.event_id:
                lost += 1
                continue
            stored += 1
            latencies.append(row.received_at - press.pressed_at)
        ids = Counter(m.event_id for m in rows)
        raised_twice = sum(n - 1 for (device, _), n in self.raised().items() if device in devices and n > 1)
        duplicated = sum(n - 1 for n in ids.values() if n > 1) + raised_twice
        return FaultReport(
            fault=fault,
            attempted=len(presses) if attempted is None else attempted,
            accepted=len(presses),
            stored=stored,
            lost=lost,
            duplicated=duplicated,
            out_of_order=sum(out_of_order([m for m in rows if m.device == d]) for d in devices),
            p50_s=_round(percentile(latencies, 0.50)),
            p99_s=_round(percentile(latencies, 0.99)),
            max_s=_round(max(latencies, default=None)),
            notes=notes,
        )


class AlertStream:
    """Test alerts at a steady rate, round robin over devices, from a background thread."""

    def __init__(self, lab: FaultLab, rate_hz: float, devices: list[str] | None = None):
        self.lab = lab
        self.interval_s = 1.0 / rate_hz
        self.devices = devices or lab.devices
        self.presses: list[Press] = []
        self.attempted = 0
        self._accepted: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-stream", daemon=True)

    def __enter__(self) -> AlertStream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def accepted_from(self, device: str) -> threading.Event:
        """Set as soon as ``device`` accepts its next press (for faults timed right after an accepted press)."""
        with self._lock:
            return self._accepted.setdefault(device, threading.Event())

    def _run(self) -> None:
        next_at = time.monotonic()
        turn = 0
        while not self._stop.is_set():
            press = self.lab.press(self.devices[turn % len(self.devices)])
            self.attempted += 1
            turn += 1
            if press is not None:
                self.presses.append(press)
                with self._lock:
                    event = self._accepted.pop(press.device, None)
                if event is not None:
                    event.set()
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def out_of_order(rows: list[StoredMessage]) -> int:
    """Alerts of one device stored after one with a higher sequence number."""
    highest, late = 0, 0
    for row in sorted(rows, key=lambda m: (m.received_at, m.seq)):
        if row.seq < highest:
            late += 1
        highest = max(highest, row.seq)
    return late


def random_moments(count: int, start: float, end: float, gap_s: float, rng: random.Random) -> list[float]:
    """``count`` moments in [start, end), at random but at least ``gap_s`` apart (room to recover)."""
    span = end - start - gap_s * (count - 1)
    if count <= 0:
        return []
    if span <= 0:
        raise ValueError(f"{count} faults {gap_s:g} s apart do not fit in {end - start:.1f} s")
    offsets = sorted(rng.uniform(0, span) for _ in range(count))
    return [start + offset + i * gap_s for i, offset in enumerate(offsets)]


def _without_speedups(text: str) -> str:
    for line in _TEST_SPEEDUPS:
        text = text.replace(line, "")
    return text


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
