"""Messages a second the centre verifies, stores and acknowledges; on PostgreSQL and SQLite; one JSON object.

    python bench/centre_throughput.py [--messages 20000] [--repeat 3] [--senders 200] [--fleet 50000] [--dir DIR]

Each run is real receiver processes (``python -m agent.cli receiver --config …``; two of them share the
MQTT group) behind a real mosquitto, on a fresh database, fed pre-signed alerts (a button alert's body,
~620 bytes signed) by enrolled devices as fast as the broker takes them. The clock runs from the first
publish to the last signed ack heard at the broker. Runs, on each engine: 1 and 2 receivers with 10
devices enrolled (all sending); 1 receiver with ``--fleet`` devices enrolled (each with its own key), the
same 10 sending; and 1 receiver with ``--fleet`` enrolled and ``--senders`` of them sending. Each run
also reports the CPU each process used while timed (the database server's too), and the receivers' CPU
per stored message. Each run is made ``--repeat`` times, interleaved with the others, and its median
attempt reported (a shared machine moves single runs by ±20 %).

Floors, on the same machine and disks: Ed25519 verifications a second with ``cryptography`` alone;
bare one-row-one-commit inserts a second with the receiver's durability (SQLite WAL synchronous=FULL,
PostgreSQL synchronous_commit on); and bare paho publishing the same signed alerts at QoS 1 to the same
broker, to the last PUBACK (what one Python MQTT client moves through one GIL, doing nothing else). ``lost``/``duplicated`` are judged from the stores: every timed
(device, seq) sent must be stored exactly once.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sqlite3
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, closing
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from joserfc.jwk import OKPKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.centre.store import open_store  # noqa: E402
from agent.config.centre import load_receiver_config  # noqa: E402
from agent.demo.broker import LocalBroker  # noqa: E402
from agent.demo.site import LocalSite  # noqa: E402
from agent.mqtt.link import MqttLink  # noqa: E402
from agent.protocol.enrolment import enrolment_record  # noqa: E402
from agent.protocol.messages import new_claims  # noqa: E402
from agent.protocol.signing import MessageSigner  # noqa: E402
from tests.faultlab import Supervised  # noqa: E402
from tests.postgres import ThrowawayPostgres, server_binaries  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "agent.cli", "--log-format", "json", "receiver", "--config"]
SMALL_FLEET = 10
#: Ack timeout for a whole run: far more than any run should take.
RUN_TIMEOUT_S = 300.0


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def enrol_fleet(site: LocalSite, keyring: Path, devices: int, senders: int) -> list[OKPKey]:
    """Enrol ``devices`` devices, each with its own key; return the keys of the first ``senders``.

    The silent majority is generated with ``cryptography`` directly and written as the enrolment
    files ``Keyring.enroll`` writes (the kid is recomputed by the receiver from the JWK).
    """
    keyring.mkdir(parents=True)
    keys = [OKPKey.generate_key("Ed25519") for _ in range(min(senders, devices))]
    for n, key in enumerate(keys):
        record = enrolment_record(f"dev-{n}", site.site, "call-point", key)
        (keyring / f"dev-{n}.json").write_text(json.dumps({k: record[k] for k in ("device_id", "site", "kind", "jwk")}))
    for n in range(len(keys), devices):
        public = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        record = {
            "device_id": f"dev-{n}",
            "site": site.site,
            "kind": "call-point",
            "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64url(public)},
        }
        (keyring / f"dev-{n}.json").write_text(json.dumps(record))
    return keys


def button_body(n: int) -> dict:
    """What a call point's agent sends when its button is pressed (``Agent.press``)."""
    return {
        "button": "main",
        "alert_kind": "assistance",
        "location": f"Ward {n % 40}, bed {n % 12}",
        "activation": "press",
        "silent": False,
    }


class Fleet:
    """The sending devices: their keys and the next sequence number of each."""

    def __init__(self, site: LocalSite, keys: list[OKPKey]):
        self.site = site
        self.signers = [MessageSigner(key) for key in keys]
        self.next_seq = [1] * len(keys)

    def alert(self, n: int) -> tuple[str, bytes, tuple[str, int]]:
        seq = self.next_seq[n]
        self.next_seq[n] += 1
        claims = new_claims(device=f"dev-{n}", site=self.site.site, seq=seq, kind="alert", body=button_body(n))
        claims["prev"] = seq - 1
        payload = self.signers[n].sign(claims).encode()
        return f"{self.site.prefix}/{self.site.site}/dev-{n}/alert", payload, (f"dev-{n}", seq)

    def alerts(self, count: int) -> list[tuple[str, bytes, tuple[str, int]]]:
        return [self.alert(i % len(self.signers)) for i in range(count)]


class AckListener:
    """Hears every signed ack at the broker: (device, seq) → the receiver that stored it."""

    def __init__(self, site: LocalSite):
        self.acks: dict[tuple[str, int], str] = {}
        self.repeats = 0
        self._awaited: set[tuple[str, int]] = set()  # what wait_for_all still waits for, emptied as acks come
        self._changed = threading.Condition()
        settings = site.receiver_config.mqtt.model_copy(update={"client_id": "bench-acks"})
        self.link = MqttLink(settings, client_id="bench-acks", secret_dirs=site.receiver_config.secret_dirs)
        self.link.on_message = self._heard
        self.link.subscribe(f"{site.prefix}/{site.site}/+/ack", qos=1)
        self.link.start()
        assert self.link.wait_connected(10) and self.link.wait_subscribed(10), "ack listener not subscribed"

    def _heard(self, topic: str, payload: bytes) -> None:
        claims = json.loads(base64.urlsafe_b64decode(payload.split(b".")[1] + b"==="))
        if claims.get("kind") != "ack":
            return
        with self._changed:
            key = (claims["device"], claims["seq"])
            self.repeats += key in self.acks
            self.acks[key] = claims["receiver"]
            self._awaited.discard(key)
            if not self._awaited:
                self._changed.notify_all()

    def wait(self, predicate, timeout: float) -> bool:
        """Wait until ``predicate(acks)`` holds; checked on every ack, so only for a warm-up's few."""
        with self._changed:
            self._awaited = set()
            return self._changed.wait_for(lambda: predicate(self.acks), timeout)

    def wait_for_all(self, keys: list[tuple[str, int]], timeout: float) -> bool:
        """Wait for an ack of every key: each ack costs a set removal, not a pass over the keys still missing."""
        with self._changed:
            self._awaited = {key for key in keys if key not in self.acks}
            return self._changed.wait_for(lambda: not self._awaited, timeout)

    def close(self) -> None:
        self.link.close()


class Centre:
    """Receiver processes on one database and one keyring, in one MQTT share group."""

    def __init__(self, site: LocalSite, workdir: Path, database: str, keyring: Path, receivers: int):
        template = site.receiver_toml_path().read_text()
        self.ids = [f"bench-{n + 1}" for n in range(receivers)]
        self.processes = []
        for receiver_id in self.ids:
            path = site.centre_dir / f"{workdir.name}-{receiver_id}.toml"
            settings = f'id = "{receiver_id}"\ndatabase = "{database}"\nkeyring_dir = "{keyring}"\n'
            path.write_text(template.replace('id = "centre-1"\n', settings, 1))
            self.processes.append(Supervised(receiver_id, [*CLI, str(path)], workdir / f"{receiver_id}.log"))
        self.config = load_receiver_config(path)

    def __enter__(self) -> Centre:
        """Start the first receiver, and the others once it has migrated the new database.

        Two receivers starting together on a brand-new SQLite file can collide while creating the schema
        (seen once in a few runs: one exits); that is a start-up matter, not what this measures.
        """
        for process in self.processes:
            process.start()
            deadline = time.monotonic() + 120
            while "started:" not in process.log_path.read_text(errors="replace") and time.monotonic() < deadline:
                if not process.is_running:
                    raise RuntimeError(f"{process.name} exited: {process.log_path.read_text()[-1500:]}")
                time.sleep(0.1)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self.processes:
            process.stop()

    def warm_up(self, fleet: Fleet, link: MqttLink, acks: AckListener, timeout: float = 120.0) -> None:
        """Alerts until every receiver has answered one: processes up, subscribed, keyring read."""
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            topic, payload, _ = fleet.alert(n % len(fleet.signers))
            link.publish(topic, payload, qos=1)
            n += 1
            if acks.wait(lambda heard: set(self.ids) <= set(heard.values()), 0.5):
                return
        tails = {p.name: p.log_path.read_text(errors="replace")[-1500:] for p in self.processes if not p.is_running}
        raise RuntimeError(f"receivers {self.ids} not all answering after {timeout:g} s; exited: {tails}")


def cpu_seconds(pid: int | None) -> float:
    """User plus system CPU a process has used so far (Linux /proc), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pg) -> float:
    """CPU seconds so far of the PostgreSQL server: its postmaster and every process it started (backends)."""
    try:
        postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
        children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    except (OSError, ValueError, IndexError):
        return 0.0
    return cpu_seconds(postmaster) + sum(cpu_seconds(int(child)) for child in children)


def cpu_snapshot(site: LocalSite, centre: Centre, pg) -> dict[str, float]:
    """CPU seconds so far of each receiver, the broker, the database server and this benchmark (publisher, acks)."""
    snapshot = {p.name: cpu_seconds(p.pid) for p in centre.processes}
    snapshot["mosquitto"] = cpu_seconds(site.broker._process.pid if site.broker._process else None)
    if pg is not None and centre.config.database_dsn is not None:
        snapshot["postgresql"] = server_cpu_seconds(pg)
    times = os.times()
    snapshot["bench"] = times.user + times.system
    return snapshot


def run(site: LocalSite, workdir: Path, database: str, keyring: Path, keys: list[OKPKey], args, receivers: int, pg):
    """One timed run: messages a second, and the (device, seq) sent, to be found in the store."""
    workdir.mkdir()
    fleet = Fleet(site, keys)
    with ExitStack() as stack:
        centre = stack.enter_context(Centre(site, workdir, database, keyring, receivers))
        acks = AckListener(site)
        stack.callback(acks.close)
        sender = MqttLink(
            site.receiver_config.mqtt.model_copy(update={"client_id": "bench-sender"}),
            client_id="bench-sender",
            secret_dirs=site.receiver_config.secret_dirs,
        )
        sender.start()
        stack.callback(sender.close)
        assert sender.wait_connected(10), "sender not connected"
        centre.warm_up(fleet, sender, acks)
        alerts = fleet.alerts(args.messages)  # signed before the clock starts
        sent = [key for _, _, key in alerts]
        cpu_before = cpu_snapshot(site, centre, pg)
        start = time.perf_counter()
        for topic, payload, _ in alerts:
            sender.publish(topic, payload, qos=1)
        heard = acks.wait_for_all(sent, RUN_TIMEOUT_S)
        elapsed = time.perf_counter() - start
        cpu_after = cpu_snapshot(site, centre, pg)
        if not heard:
            print(f"warning: {workdir.name}: acks missing after {RUN_TIMEOUT_S:g} s", file=sys.stderr)
        by_receiver = {rid: sum(1 for key in sent if acks.acks.get(key) == rid) for rid in centre.ids}
        sizes = sorted(len(payload) for _, payload, _ in alerts)
    lost, duplicated = judge(centre.config, sent)
    result = {
        "msgs_per_s": round(len(sent) / elapsed, 1),
        "seconds": round(elapsed, 2),
        "acks_by_receiver": by_receiver,
        "signed_bytes": [sizes[0], sizes[-1]],
        # Share of one core each process used while timed: tells a CPU-bound receiver from a waiting one.
        "cores_used": {name: round((cpu_after[name] - cpu_before[name]) / elapsed, 2) for name in cpu_after},
        # Receiver CPU per stored message: what one receiver process would do with a core to itself.
        "receiver_cpu_ms_per_msg": round(sum(cpu_after[r] - cpu_before[r] for r in centre.ids) * 1000 / len(sent), 3),
        "lost": lost,
        "duplicated": duplicated,
    }
    print(f"{workdir.name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def judge(config, sent: list[tuple[str, int]]) -> tuple[int, int]:
    """Lost and duplicated, from the store: every sent (device, seq) exactly once."""
    with open_store(config) as store:
        rows = store._db.execute("SELECT device, seq, count(*) FROM messages GROUP BY device, seq").fetchall()
    stored = {(device, seq): count for device, seq, count in rows}
    lost = sum(1 for key in sent if key not in stored)
    duplicated = sum(stored[key] - 1 for key in sent if key in stored)
    return lost, duplicated


def ed25519_verify_rate(seconds: float) -> float:
    key = Ed25519PrivateKey.generate()
    message = os.urandom(450)
    signature = key.sign(message)
    public = key.public_key()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            public.verify(signature, message)
        count += 100
    return count / (time.perf_counter() - start)


def sqlite_insert_rate(path: Path, seconds: float) -> float:
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (device TEXT, seq INTEGER, claims TEXT, PRIMARY KEY (device, seq))")
        return _insert_rate(lambda n: db.execute("INSERT INTO t VALUES (?, ?, ?)", ("dev", n, "x" * 450)), seconds)


def postgres_insert_rate(dsn: str, seconds: float) -> float:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("SET synchronous_commit TO on")
        db.execute("CREATE TABLE t (device TEXT, seq BIGINT, claims TEXT, PRIMARY KEY (device, seq))")
        return _insert_rate(lambda n: db.execute("INSERT INTO t VALUES (%s, %s, %s)", ("dev", n, "x" * 450)), seconds)


def _insert_rate(insert, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        insert(count)  # autocommit: one commit (one fsync) per row
        count += 1
    return count / (time.perf_counter() - start)


def create_database(admin_dsn: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return admin_dsn.replace("/postgres?", f"/{name}?")


def engine_runs(engine: str, site: LocalSite, tmp: Path, pg, keys: dict, args, floor: dict) -> dict:
    """The engine's insert floor, then its three runs (1 and 2 receivers, 10 enrolled; 1 receiver, the fleet)."""

    def database(name: str) -> str:
        return create_database(pg.dsn, name) if engine == "postgresql" else str(tmp / f"{name}.sqlite")

    if engine == "postgresql":
        floor["postgresql_insert_per_s"] = round(postgres_insert_rate(database("floor"), args.floor_seconds))
    else:
        floor["sqlite_insert_per_s"] = round(sqlite_insert_rate(tmp / "floor.sqlite", args.floor_seconds))
    plans = {  # name: (keyring, receivers, devices sending)
        "one_receiver": ("small", 1, SMALL_FLEET),
        "two_receivers": ("small", 2, SMALL_FLEET),
        # The same ten senders among the whole fleet: the cost of the enrolled count alone.
        f"enrolled_{args.fleet}": ("large", 1, SMALL_FLEET),
        # And many senders at once: a batch then touches as many device rows as it holds messages.
        f"enrolled_{args.fleet}_senders_{args.senders}": ("large", 1, args.senders),
    }
    chosen = {
        name: plan
        for name, plan in plans.items()
        if args.runs is None or name.split("_senders")[0].replace(f"_{args.fleet}", "") in args.runs
    }
    results: dict[str, list[dict]] = {name: [] for name in chosen}
    for attempt in range(1, args.repeat + 1):  # interleaved, so a noisy minute spreads over every plan
        for name, (fleet, receivers, senders) in chosen.items():
            label = f"{engine}_{name}_{attempt}"
            keyring = tmp / f"keyring-{fleet}"
            run_args = (site, tmp / label, database(label), keyring, keys[fleet][:senders], args, receivers, pg)
            results[name].append(run(*run_args))
    return {name: median_run(attempts) for name, attempts in results.items()}


def median_run(attempts: list[dict]) -> dict:
    """The attempt with the median rate, with every attempt's rate beside it, and lost/duplicated over all."""
    ranked = sorted(attempts, key=lambda result: result["msgs_per_s"])
    chosen = dict(ranked[len(ranked) // 2])
    chosen["attempts_msgs_per_s"] = [result["msgs_per_s"] for result in attempts]
    chosen["lost"] = sum(result["lost"] for result in attempts)
    chosen["duplicated"] = sum(result["duplicated"] for result in attempts)
    return chosen


def paho_publish_rate(site: LocalSite, fleet: Fleet, count: int) -> float:
    """Bare paho: the same signed alerts published at QoS 1 to the same broker, timed to the last PUBACK."""
    import paho.mqtt.client as paho

    alerts = fleet.alerts(count)
    done = threading.Event()
    acked = [0]

    def on_publish(client, userdata, mid, reason_code, properties) -> None:
        acked[0] += 1
        if acked[0] == count:
            done.set()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-floor", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(100)  # as the agent's links
    client.on_publish = on_publish
    client.connect(site.broker.host, site.broker.port)
    client.loop_start()
    try:
        start = time.perf_counter()
        for topic, payload, _ in alerts:
            client.publish(f"floor/{topic}", payload, qos=1)  # a topic no receiver reads
        if not done.wait(RUN_TIMEOUT_S):
            raise RuntimeError(f"paho floor: {acked[0]} of {count} PUBACKs")
        return count / (time.perf_counter() - start)
    finally:
        client.disconnect()
        client.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="timed alerts per run")
    parser.add_argument("--senders", type=int, default=200, help="devices that send (of those enrolled)")
    parser.add_argument("--fleet", type=int, default=50_000, help="devices enrolled in the large-fleet runs")
    parser.add_argument("--floor-seconds", type=float, default=2.0, help="how long each floor is measured")
    parser.add_argument("--engines", nargs="+", default=["postgresql", "sqlite"], choices=["postgresql", "sqlite"])
    parser.add_argument(
        "--runs", nargs="+", choices=["one_receiver", "two_receivers", "enrolled"], help="only these runs (profiling)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="attempts per run; the median is reported")
    parser.add_argument("--dir", default=None, help="where databases go (a real disk: commits cost fsyncs)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    binaries = server_binaries()
    if "postgresql" in args.engines and binaries is None:
        parser.error("no PostgreSQL server binaries (Debian: apt-get install postgresql)")
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir)))
        broker = stack.enter_context(LocalBroker(workdir=tmp / "mosquitto"))
        site = LocalSite(tmp / "site", broker)
        started = time.perf_counter()
        small_keys = enrol_fleet(site, tmp / "keyring-small", SMALL_FLEET, args.senders)
        large_keys = enrol_fleet(site, tmp / "keyring-large", args.fleet, args.senders)
        print(f"enrolled {args.fleet} devices in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        pg = stack.enter_context(ThrowawayPostgres(binaries)) if "postgresql" in args.engines else None
        out: dict = {"floor": {"ed25519_verify_per_s": round(ed25519_verify_rate(args.floor_seconds))}}
        floor_fleet = Fleet(site, small_keys[:SMALL_FLEET])
        out["floor"]["paho_publish_puback_per_s"] = round(paho_publish_rate(site, floor_fleet, args.messages))
        lost = duplicated = 0
        for engine in args.engines:
            runs = engine_runs(engine, site, tmp, pg, {"small": small_keys, "large": large_keys}, args, out["floor"])
            out[engine] = {f"{name}_msgs_per_s": result["msgs_per_s"] for name, result in runs.items()}
            out[engine]["runs"] = runs
            lost += sum(result["lost"] for result in runs.values())
            duplicated += sum(result["duplicated"] for result in runs.values())
        out.update(
            lost=lost,
            duplicated=duplicated,
            messages_per_run=args.messages,
            senders=args.senders,
            cpus=os.cpu_count(),
            total_s=round(time.perf_counter() - started, 1),
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
