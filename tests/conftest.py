"""Shared fixtures: gpiozero's MockFactory, a real mosquitto on loopback, a local site with a receiver."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from agent.centre.receiver import Receiver, Verdict
from agent.demo.broker import LocalBroker
from agent.demo.site import LocalSite
from agent.errors import MosquittoMissing

REPO = Path(__file__).resolve().parent.parent
#: The one setting that finds the shared test models and footage.
SHARED_DIR = Path(os.environ.get("EDGE_AGENT_SHARED", REPO.parent / "shared"))


def agent_run_argv(config_path: Path) -> list[str]:
    """``edge-agent run`` of one device on gpiozero's mock pins, as a process of its own (as systemd runs it)."""
    return [sys.executable, "-m", "agent.cli", "run", "--mock-pins", "--config", str(config_path)]


def wait_until(condition, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


@pytest.fixture
def mock_factory():
    """gpiozero's own MockFactory, installed as the default and restored afterwards."""
    previous = Device.pin_factory
    factory = MockFactory()
    Device.pin_factory = factory
    yield factory
    factory.reset()
    Device.pin_factory = previous


@pytest.fixture
def broker(tmp_path):
    try:
        with LocalBroker(workdir=tmp_path / "mosquitto") as running:
            yield running
    except MosquittoMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture
def site(tmp_path, broker) -> LocalSite:
    return LocalSite(tmp_path / "site", broker)


class VerdictLog:
    """Everything the receiver decided, in arrival order, waitable."""

    def __init__(self):
        self.verdicts: list[Verdict] = []
        self._lock = threading.Lock()

    def __call__(self, verdict: Verdict) -> None:
        with self._lock:
            self.verdicts.append(verdict)

    def accepted(self, kind: str | None = None) -> list[Verdict]:
        with self._lock:
            return [v for v in self.verdicts if v.outcome == "accepted" and (kind is None or v.claims.kind == kind)]

    def with_outcome(self, outcome: str) -> list[Verdict]:
        with self._lock:
            return [v for v in self.verdicts if v.outcome == outcome]


@pytest.fixture
def verdicts() -> VerdictLog:
    return VerdictLog()


@pytest.fixture
def receiver(site, verdicts):
    with Receiver(site.receiver_config, on_verdict=verdicts) as running:
        assert running.link.wait_subscribed(10), "receiver could not connect and subscribe to the test broker"
        yield running


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL (Debian's) for the session, on a unix socket in a temp dir; skipped with the reason if absent."""
    from tests.postgres import ThrowawayPostgres, server_binaries

    binaries = server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
    with ThrowawayPostgres(binaries) as server:
        yield server
