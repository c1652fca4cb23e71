"""The faults: what is broken, when, and for how long, over a steady stream of alerts.

Each plan builds its own ``FaultLab`` under ``root`` (so one fault cannot
leave another a broken site), runs a stream of test alerts, injects its fault
at random moments, lets the site recover, and returns ``FaultReport``s. The
test suite runs them small; ``bench/faults.py`` runs them long.

A plan that cannot set its fault up here (no permission to mount a tmpfs, no
libfaketime) raises ``FaultUnavailable`` with the reason.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.faultlab import AlertStream, FaultLab, FaultReport, Press, random_moments

#: How long the site gets, after the last fault, to store everything accepted: the device's default
#: ack_retry_s (15 s) plus room for one more round trip and a restart.
SETTLE_S = 30.0
#: Where Debian's libfaketime lives (package faketime); the MT build is safe with threads.
FAKETIME_GLOB = "/usr/lib/*/faketime/libfaketimeMT.so.1"


class FaultUnavailable(RuntimeError):
    """This machine cannot inject the fault (the message says why)."""


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def _run(
    lab: FaultLab,
    fault: str,
    *,
    alerts: int,
    rate: float,
    moments: list[float],
    inject: Callable[[int, AlertStream], None],
    recover: Callable[[], None] = lambda: None,
) -> FaultReport:
    """Stream ``alerts / rate`` seconds of alerts, call ``inject(i, stream)`` at each moment, recover, judge."""
    duration = alerts / rate
    with AlertStream(lab, rate) as stream:
        start = time.monotonic()
        for i, moment in enumerate(moments):
            _sleep_until(start + moment)
            inject(i, stream)
        _sleep_until(start + duration)
    recover()
    missing = lab.wait_stored(stream.presses, SETTLE_S)
    return lab.report(fault, stream.presses, stream.attempted, missing_after_settle=len(missing))


def _started(lab: FaultLab, receivers: tuple[str, ...] = ("centre-1",)) -> FaultLab:
    try:
        lab.start_all(receivers)
        lab.warm_up()
    except BaseException:
        lab.close()
        raise
    return lab


def _devices(count: int) -> tuple[str, ...]:
    return tuple(f"cp-{i}" for i in range(1, count + 1))


# (a) The agent is killed, as by a power cut, and started again as systemd would.


def agent_kills(
    root: Path,
    *,
    alerts: int = 120,
    rate: float = 10.0,
    kills: int = 2,
    restart_s: float = 2.0,
    seed: int = 1,
    **settings: str,
) -> FaultReport:
    rng = random.Random(seed)
    with _started(FaultLab(root, _devices(2), **settings)) as lab:
        victims = [rng.choice(lab.devices) for _ in range(kills)]

        def kill(i: int, stream: AlertStream) -> None:
            # Right after it accepted a press: committed, and perhaps not yet sent or acknowledged.
            stream.accepted_from(victims[i]).wait(timeout=2.0)
            lab.agents[victims[i]].kill()
            time.sleep(restart_s)
            lab.agents[victims[i]].start()

        def recover() -> None:
            for device in lab.devices:
                lab.start_agent(device)

        moments = random_moments(kills, 1.0, alerts / rate - 1.0, restart_s + 4.0, rng)
        return _run(lab, "agent_sigkill", alerts=alerts, rate=rate, moments=moments, inject=kill, recover=recover)


# (b) The broker is killed mid-burst and comes back on the same port, with nothing it held in memory.


def broker_kills(
    root: Path,
    *,
    alerts: int = 100,
    rate: float = 10.0,
    kills: int = 1,
    down_s: float = 1.0,
    seed: int = 2,
    **settings: str,
) -> FaultReport:
    rng = random.Random(seed)
    with _started(FaultLab(root, _devices(2), **settings)) as lab:

        def kill(i: int, stream: AlertStream) -> None:
            lab.broker.kill()
            time.sleep(down_s)
            lab.broker.start()

        moments = random_moments(kills, 1.0, alerts / rate - 1.0, down_s + 5.0, rng)
        return _run(lab, "broker_sigkill", alerts=alerts, rate=rate, moments=moments, inject=kill)


# (c) The receiver is killed mid-burst; systemd starts it again after RestartSec=2.


def receiver_kills(
    root: Path,
    *,
    alerts: int = 100,
    rate: float = 10.0,
    kills: int = 1,
    restart_s: float = 2.0,
    seed: int = 3,
    **settings: str,
) -> FaultReport:
    rng = random.Random(seed)
    with _started(FaultLab(root, _devices(2), **settings)) as lab:
        receiver = lab.receivers["centre-1"]

        def kill(i: int, stream: AlertStream) -> None:
            receiver.kill()
            time.sleep(restart_s)
            receiver.start()

        moments = random_moments(kills, 1.0, alerts / rate - 1.0, restart_s + 5.0, rng)
        return _run(lab, "receiver_sigkill", alerts=alerts, rate=rate, moments=moments, inject=kill)


def receiver_lost(root: Path, *, alerts: int = 100, rate: float = 10.0, seed: int = 4, **settings: str) -> FaultReport:
    """Two receivers share the group; one is killed for good. The other must carry every alert."""
    rng = random.Random(seed)
    with _started(FaultLab(root, _devices(2), **settings), receivers=("centre-1", "centre-2")) as lab:
        (moment,) = random_moments(1, 1.0, alerts / rate / 2, 0.0, rng)
        kill = lambda i, stream: lab.receivers["centre-2"].kill()  # noqa: E731 - one line, read where it is used
        return _run(lab, "receiver_lost_of_two", alerts=alerts, rate=rate, moments=[moment], inject=kill)


# (d) The centre's storage fills up, then is freed.


def mount_tmpfs(path: Path, size_mb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise FaultUnavailable(f"cannot mount a tmpfs on {path}: {done.stderr.strip() or done.returncode}")


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write zeros until the file system says ENOSPC; the file is what to delete to free it."""
    filler = directory / "filler.bin"
    chunk = bytes(64 * 1024)
    with filler.open("wb", buffering=0) as out:
        while True:
            try:
                out.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    for size in (4096, 512, 1):  # the last crumbs too, so that no page is left to write into
        with filler.open("ab", buffering=0) as out:
            try:
                while True:
                    out.write(bytes(size))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def centre_storage_full(
    root: Path, *, alerts: int = 100, rate: float = 10.0, full_s: float = 4.0, size_mb: int = 16, **settings: str
) -> FaultReport:
    """The receiver's state directory (database, keyring, keys) on a small tmpfs, filled mid-stream."""
    centre = Path(root) / "site" / "centre"  # where FaultLab's LocalSite puts the centre
    mount_tmpfs(centre, size_mb)
    try:
        with _started(FaultLab(root, _devices(2), **settings)) as lab:
            state = {"filler": None}

            def fill_then_free(i: int, stream: AlertStream) -> None:
                state["filler"] = fill(centre)
                time.sleep(full_s)
                state["filler"].unlink()

            report = _run(lab, "centre_storage_full", alerts=alerts, rate=rate, moments=[1.0], inject=fill_then_free)
            report.notes["store_failed"] = lab.log_count("centre-1", "store_failed")
            return report
    finally:
        unmount(centre)


# (e) The device's clock is minutes off (no NTP, a dead RTC battery).


def faketime_env(offset_s: int) -> dict[str, str]:
    """Environment that runs a process with its wall clock shifted (libfaketime); monotonic time is left alone,
    as a wrong RTC leaves it."""
    libraries = sorted(glob.glob(FAKETIME_GLOB))
    if not libraries:
        raise FaultUnavailable(f"libfaketime not found ({FAKETIME_GLOB}); apt-get install -y faketime")
    env = {"LD_PRELOAD": libraries[0], "FAKETIME": f"{offset_s:+d}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    probe = "import json, time; print(json.dumps([time.time(), time.monotonic()]))"
    before = time.time()
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True)
    try:
        shifted = json.loads(done.stdout)[0] - before
    except (ValueError, IndexError):
        raise FaultUnavailable(f"python under libfaketime did not run: {done.stderr.strip()[-300:]}") from None
    if abs(shifted - offset_s) > 5:
        raise FaultUnavailable(f"libfaketime did not shift python's time.time() by {offset_s} s (got {shifted:+.1f})")
    return env


def device_clock_off(
    root: Path, *, offsets: tuple[int, ...] = (300, -300), presses: int = 5, **settings: str
) -> list[FaultReport]:
    """Each device's first alert is pressed the moment its agent answers, before it has heard the centre."""
    names = {f"clock-{'ahead' if offset > 0 else 'behind'}-{abs(offset)}s": offset for offset in offsets}
    envs = {name: faketime_env(offset) for name, offset in names.items()}
    with FaultLab(root, tuple(names), device_env=envs, **settings) as lab:
        lab.start_receiver()
        by_device: dict[str, list[Press]] = {}
        for name in names:
            lab.agents[name].start()
            by_device[name] = [_first_press(lab, name)]
        for _ in range(presses - 1):
            time.sleep(1.0)
            for name in names:
                press = lab.press(name)
                by_device[name] += [press] if press else []
        lab.wait_stored([p for ps in by_device.values() for p in ps], SETTLE_S)
        with lab.store() as store:
            skews = {s.device: s.clock_skew_s for s in store.registry(90).states()}
            errors = {m.device: m.claims.get("clock_error_s") for m in store.messages(kind="alert")}
        reports = []
        for name, offset in names.items():
            naks = lab.status(name).get("delivery", {}).get("naks")
            notes = {"clock_error_s": errors.get(name), "centre_clock_skew_s": skews.get(name), "naks": naks}
            reports.append(lab.report(f"device_clock_{offset:+d}s", by_device[name], **notes))
        return reports


def _first_press(lab: FaultLab, device: str, timeout: float = 20.0) -> Press:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        press = lab.press(device)
        if press is not None:
            return press
        time.sleep(0.02)
    raise RuntimeError(f"agent {device} did not accept a press within {timeout:g} s")


# A backlog: alerts committed while the broker is down, then the broker returns.


def backlog(
    root: Path, *, alerts: int = 10_000, devices: int = 4, timeout: float = 300.0, **settings: str
) -> tuple[float | None, FaultReport]:
    """Seconds from the broker's return until every alert committed while it was down is stored (None: not
    within ``timeout``)."""
    with _started(FaultLab(root, _devices(devices), **settings)) as lab:
        lab.broker.kill()
        per_device = {device: [] for device in lab.devices}

        def raise_alerts(device: str, count: int) -> None:
            per_device[device] = [p for p in (lab.press(device) for _ in range(count)) if p is not None]

        threads = [
            threading.Thread(target=raise_alerts, args=(d, alerts // devices + (i < alerts % devices)))
            for i, d in enumerate(lab.devices)
        ]
        raising = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        raised_s = time.monotonic() - raising
        presses = [p for ps in per_device.values() for p in ps]
        lab.broker.start()
        back, back_wall = time.monotonic(), time.time()
        pending = {(p.device, p.seq) for p in presses}
        while pending and time.monotonic() - back < timeout:
            pending -= lab.stored_keys()
            time.sleep(0.25)
        stored_s = time.monotonic() - back
        report = lab.report(f"backlog_{alerts}", presses, alerts, raised_s=round(raised_s, 1))
        report.notes["retransmitted"] = sum(
            lab.status(d).get("delivery", {}).get("retransmitted", 0) for d in lab.devices
        )
        reconnected = [lab.last_logged(name, '"connected to ') for name in [*lab.receivers, *lab.devices]]
        report.notes["last_reconnect_s"] = round(max(t or back_wall for t in reconnected) - back_wall, 2)
        return (round(stored_s, 2) if not pending else None), report
