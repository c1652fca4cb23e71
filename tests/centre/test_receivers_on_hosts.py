"""Three receivers on three "hosts" (network namespaces) sharing one PostgreSQL; one is SIGKILLed mid-burst.

The test makes its own network: a bridge in this namespace with the one address 10.231.N.1 on a /24 that
exists only for the test, and per receiver a network namespace joined to the bridge by a veth pair. Broker
and PostgreSQL listen on the bridge address alone; a namespace has no default route, so a receiver can reach
nothing else. Devices run here and reach the broker on the same address. Everything is removed at the end.
Where namespaces cannot be made (not root, no iproute2, a sandbox), the test is skipped with the reason.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from agent.demo.broker import free_port
from tests import faultplans
from tests.agent.test_faults import LATENCY_TARGET_S, assert_exactly_once
from tests.conftest import wait_until
from tests.faultlab import FaultLab
from tests.postgres import ThrowawayPostgres, server_binaries

RECEIVERS = ("centre-1", "centre-2", "centre-3")
VICTIM = "centre-2"


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


@dataclass
class Hosts:
    """A bridge here and one network namespace per host on it, all on ``10.231.<n>.0/24``."""

    tag: str
    net: int
    namespaces: list[str] = field(default_factory=list)
    prefixes: list[list[str]] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"eabr{self.tag}"

    @property
    def address(self) -> str:
        return f"10.231.{self.net}.1"

    @property
    def subnet(self) -> str:
        return f"10.231.{self.net}.0/24"

    def add(self, index: int) -> None:
        """Host ``index`` (10.231.<n>.<10+index>): its namespace made and wired, and the command prefix to run in it."""
        name, veth = f"ea{self.tag}h{index}", f"eav{self.tag}{index}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", name, "addr", "add", f"10.231.{self.net}.{10 + index}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        self.prefixes.append(["ip", "netns", "exec", name])

    def remove(self) -> None:
        for name in self.namespaces:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=10)


def _unused_net() -> int:
    """A 10.231.<n>.0/24 no interface on this machine uses yet."""
    taken = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
    for net in random.Random(os.getpid()).sample(range(1, 255), 254):
        if f"10.231.{net}." not in taken:
            return net
    raise OSError("every 10.231.<n>.0/24 is in use")


@contextmanager
def hosts(count: int) -> Iterator[Hosts]:
    """The test's network with ``count`` hosts, or a skip saying why it cannot be made here."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed: apt-get install iproute2")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
    made = Hosts(tag=f"{os.getpid() % 10000:04d}", net=0)
    try:
        made.net = _unused_net()
        _ip("link", "add", made.bridge, "type", "bridge")
        _ip("addr", "add", f"{made.address}/24", "dev", made.bridge)
        _ip("link", "set", made.bridge, "up")
        for index in range(1, count + 1):
            made.add(index)
    except OSError as exc:
        made.remove()
        pytest.skip(f"cannot make network namespaces here: {exc}")
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
def network() -> Iterator[Hosts]:
    with hosts(len(RECEIVERS)) as made:
        yield made


@pytest.fixture
def centre_database(network: Hosts) -> Iterator[str]:
    """A PostgreSQL of its own, on the bridge address, trusting only the test's subnet."""
    pytest.importorskip("psycopg")
    binaries = server_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
    listen = (network.address, free_port(network.address))
    with ThrowawayPostgres(binaries, listen=listen, trusted_subnet=network.subnet) as server:
        yield server.dsn


def _in_namespace(pid: int) -> str:
    return subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True).stdout.strip()


def _acknowledged(lab: FaultLab) -> bool:
    return all(lab.status(device).get("pending_alerts") == [] for device in lab.devices)


def test_three_receivers_on_their_own_hosts_one_killed_mid_burst(tmp_path, network, centre_database):
    prefixes = dict(zip(RECEIVERS, network.prefixes, strict=True))
    lab = FaultLab(
        tmp_path,
        ("cp-1", "cp-2"),
        receiver_settings=f'database = "{centre_database}"\n',
        broker_host=network.address,
        receiver_prefixes=prefixes,
    )
    with faultplans._started(lab, receivers=RECEIVERS):
        for receiver, prefix in prefixes.items():  # each really is on its host, and is the process we will kill
            pid = lab.receivers[receiver].pid
            assert _in_namespace(pid) == prefix[-1], receiver
            assert b"agent.cli" in open(f"/proc/{pid}/cmdline", "rb").read()

        def kill(i, stream) -> None:
            stream.accepted_from("cp-1").wait(timeout=2.0)  # committed, perhaps on its way to the victim
            lab.receivers[VICTIM].kill()

        report = faultplans._run(lab, "receiver_host_lost", alerts=90, rate=10.0, moments=[4.0], inject=kill)
        acknowledged = wait_until(lambda: _acknowledged(lab), 30.0, interval=0.2)
        raised_by = {r: lab.log_count(r, "TEST ALERT from ") for r in RECEIVERS}

    assert_exactly_once(report)  # stored once (PostgreSQL), raised once (all logs), none lost
    assert report.p99_s <= LATENCY_TARGET_S, report
    assert acknowledged, "alerts still unacknowledged in an agent's outbox"
    assert lab.receivers[VICTIM].starts == 1  # killed once, never restarted
    assert all(raised_by.values()), f"a receiver took no share of the alerts: {raised_by}"
