"""Alert stored → shown on every open console page, under a city's load; one JSON object.

    python bench/console_load.py [--devices 1000] [--alerts-per-min 100] [--pages 20] [--seconds 120]

Real processes: mosquitto, one ``edge-agent receiver`` (SQLite) and one ``edge-agent centre console``.
``--devices`` enrolled devices (each its own Ed25519 key) send signed telemetry every
``--telemetry-s`` seconds (spread evenly) and, from devices drawn at random, ``--alerts-per-min``
signed button alerts. ``--pages`` console pages are open: each is logged in, holds the event stream
(``/events``) and, as the page's script does, fetches the queue fragment again on every "change"
(one fetch in flight per page; a change during a fetch means one more fetch after it). Latency per
(alert, page): when the page had the fragment listing the alert, minus the alert's ``received_at`` in
the store (the receiver's arrival time, before its commit). Everything runs on this machine, so the
figures include the competition for its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.centre.store import open_store  # noqa: E402
from agent.config.centre import load_receiver_config  # noqa: E402
from agent.console.auth import hash_password  # noqa: E402
from agent.console.state import ConsoleState  # noqa: E402
from agent.demo.broker import LocalBroker  # noqa: E402
from agent.demo.site import LocalSite  # noqa: E402
from agent.mqtt.link import MqttLink  # noqa: E402
from agent.protocol.messages import new_claims  # noqa: E402
from bench.centre_throughput import Fleet, cpu_seconds, enrol_fleet  # noqa: E402
from tests.faultlab import Supervised  # noqa: E402

CLI = [sys.executable, "-m", "agent.cli", "--log-format", "json"]
PASSWORD = "bench password, long enough"
ROW = re.compile(r'data-alert="([^"]+)"')


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Load:
    """Signed telemetry from every device and alerts at the given rate, from one publishing thread."""

    def __init__(self, site: LocalSite, fleet: Fleet, telemetry_s: float, alerts_per_min: float):
        self.site, self.fleet = site, fleet
        self.telemetry_gap = telemetry_s / len(fleet.signers)
        self.alert_gap = 60.0 / alerts_per_min
        self.sent_alerts: list[tuple[str, int]] = []
        self.telemetry_sent = 0
        self._stop = threading.Event()
        settings = site.receiver_config.mqtt.model_copy(update={"client_id": "bench-load"})
        self.link = MqttLink(settings, client_id="bench-load", secret_dirs=site.receiver_config.secret_dirs)
        self.link.start()
        assert self.link.wait_connected(10), "load publisher not connected"
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        next_telemetry = next_alert = time.monotonic()
        device = 0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_alert:
                topic, payload, key = self.fleet.alert(random.randrange(len(self.fleet.signers)))
                self.link.publish(topic, payload, qos=1)
                self.sent_alerts.append(key)
                next_alert += self.alert_gap
            if now >= next_telemetry:
                self._telemetry(device)
                device = (device + 1) % len(self.fleet.signers)
                next_telemetry += self.telemetry_gap
            self._stop.wait(max(0.0, min(next_alert, next_telemetry) - time.monotonic()))

    def _telemetry(self, n: int) -> None:
        seq = self.fleet.next_seq[n]
        self.fleet.next_seq[n] += 1
        body = {"uptime_s": 100.0, "outbox_depth": 0, "tamper": "closed", "last_test_alert": None}
        claims = new_claims(device=f"dev-{n}", site=self.site.site, seq=seq, kind="telemetry", body=body)
        topic = f"{self.site.prefix}/{self.site.site}/dev-{n}/telemetry"
        self.link.publish(topic, self.fleet.signers[n].sign(claims).encode(), qos=1)
        self.telemetry_sent += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.link.close()


async def page(base: str, seen: dict[str, float], ready: asyncio.Event, stop: asyncio.Event, fetches: list[int]):
    """One open queue page: logged in, on the event stream, fetching its fragment as the script does."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        form = await client.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        logged = await client.post("/login", data={"name": "bench", "password": PASSWORD, "csrf": token})
        assert logged.status_code == 303, f"bench login refused: {logged.status_code}"
        wanted = asyncio.Event()

        async def fetcher():
            while not stop.is_set():
                await wanted.wait()
                wanted.clear()
                html = (await client.get("/fragment/queue")).text
                fetches[0] += 1
                now = time.time()
                for key in ROW.findall(html):
                    seen.setdefault(key, now)

        task = asyncio.create_task(fetcher())
        async with client.stream("GET", "/events", timeout=None) as stream:
            ready.set()
            async for line in stream.aiter_lines():
                if line.startswith("event: queue"):  # what the queue page's script listens to
                    wanted.set()
                if stop.is_set():
                    break
        task.cancel()


async def open_pages(base: str, count: int, stop: asyncio.Event):
    seen = [{} for _ in range(count)]
    readies = [asyncio.Event() for _ in range(count)]
    fetches = [0]
    tasks = [asyncio.create_task(page(base, seen[n], readies[n], stop, fetches)) for n in range(count)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
    return tasks, seen, fetches


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def measure(args, base: str, load: Load, config) -> dict:
    stop = asyncio.Event()
    tasks, seen, fetches = await open_pages(base, args.pages, stop)
    load.start()
    await asyncio.sleep(args.seconds)
    load.stop()
    await asyncio.sleep(3)  # the last alerts reach the pages
    stop.set()
    for task in tasks:
        task.cancel()
    with open_store(config) as store:
        stored = {f"{m.device}/{m.seq}": m.received_at for m in store.messages(kind="alert")}
    latencies, missing = [], 0
    for key in (f"{device}/{seq}" for device, seq in load.sent_alerts):
        for page_seen in seen:
            if key in page_seen and key in stored:
                latencies.append(page_seen[key] - stored[key])
            else:
                missing += 1
    return {"latencies": latencies, "missing": missing, "fetches": fetches[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--alerts-per-min", type=float, default=100.0)
    parser.add_argument("--telemetry-s", type=float, default=60.0, help="each device's heartbeat interval")
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="console-load-") as root, LocalBroker() as broker:
        site = LocalSite(Path(root) / "site", broker)
        keyring = Path(root) / "keyring"
        keys = enrol_fleet(site, keyring, args.devices, args.devices)
        path = site.centre_dir / "load.toml"
        port = free_port()
        settings = f'id = "load-1"\nkeyring_dir = "{keyring}"\nsupervision_s = 600\n'
        text = site.receiver_toml_path().read_text().replace('id = "centre-1"\n', settings, 1)
        path.write_text(text + f'\n[console]\nlisten = "127.0.0.1:{port}"\n')
        config = load_receiver_config(path)
        with open_store(config) as store:
            ConsoleState(store).add_operator("bench", hash_password(PASSWORD), "operator", time.time())
        logs = Path(root)
        receiver = Supervised("receiver", [*CLI, "receiver", "--config", str(path)], logs / "receiver.log")
        console = Supervised("console", [*CLI, "centre", "console", "--config", str(path)], logs / "console.log")
        receiver.start()
        console.start()
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    httpx.get(base + "/login", timeout=2)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            load = Load(site, Fleet(site, keys), args.telemetry_s, args.alerts_per_min)
            cpu_before = {p.name: cpu_seconds(p.pid) for p in (receiver, console)}
            started = time.perf_counter()
            found = asyncio.run(measure(args, base, load, config))
            elapsed = time.perf_counter() - started
            cpu = {p.name: round((cpu_seconds(p.pid) - cpu_before[p.name]) / elapsed, 2) for p in (receiver, console)}
        finally:
            console.stop()
            receiver.stop()
    latencies = found["latencies"]
    result = {
        "devices": args.devices,
        "alerts_per_min": args.alerts_per_min,
        "telemetry_per_s": round(args.devices / args.telemetry_s, 1),
        "pages": args.pages,
        "seconds": args.seconds,
        "alerts_sent": len(load.sent_alerts),
        "telemetry_sent": load.telemetry_sent,
        "shown": len(latencies),
        "not_shown": found["missing"],
        "stored_to_shown_s": {
            "p50": round(percentile(latencies, 50), 3),
            "p95": round(percentile(latencies, 95), 3),
            "p99": round(percentile(latencies, 99), 3),
            "max": round(max(latencies), 3),
        }
        if latencies
        else None,
        "fragment_fetches": found["fetches"],
        "cores_used": cpu,
    }
    print(json.dumps(result))
    return 0 if latencies and not found["missing"] else 1


if __name__ == "__main__":
    sys.exit(main())
