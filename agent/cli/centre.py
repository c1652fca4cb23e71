"""The centre's side of the ``edge-agent`` command line: ``edge-agent receiver …``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.cli.output import print_json, stop_on_signals
from agent.errors import ConfigError


def cmd_receiver_run(args: argparse.Namespace) -> int:
    import threading

    from agent.centre.home_assistant import attach_feed
    from agent.centre.receiver import Receiver
    from agent.config.centre import load_receiver_config
    from agent.runtime.sdnotify import HealthWatchdog, SystemdNotifier

    receiver = Receiver(load_receiver_config(args.config))
    feed = attach_feed(receiver)  # [forward.home_assistant]: None when off
    done = threading.Event()
    stop_on_signals(done.set)
    receiver.start()
    if feed is not None:
        feed.start()
    notifier = SystemdNotifier()
    notifier.notify("READY=1", "STATUS=receiving")
    watchdog = HealthWatchdog(receiver.problems, notifier, "receiving")
    watchdog.start()
    done.wait()
    watchdog.stop()
    notifier.notify("STOPPING=1")
    if feed is not None:
        feed.close()
    receiver.close()
    return 0


def cmd_receiver_devices(args: argparse.Namespace) -> int:
    import time

    from tabulate import tabulate

    from agent.centre.keyring import Keyring
    from agent.centre.store import open_store
    from agent.config.centre import load_receiver_config

    config = load_receiver_config(args.config)
    enrolled = {d.device_id: d for d in Keyring(config.keyring_path).devices()}
    with open_store(config) as store:
        states = {s.device: s for s in store.registry(config.receiver.supervision_s).states()}
        outstanding: dict[str, list[int]] = {}
        for device, seq, _ in store.outstanding():
            outstanding.setdefault(device, []).append(seq)
    now = time.time()
    rows = []
    for device_id in sorted(set(enrolled) | set(states)):
        state = states.get(device_id)
        info = enrolled.get(device_id)
        telemetry = (state.last_telemetry if state else None) or {}
        if state is None or state.last_seen is None:
            shown, seen = ("missing" if state and state.missing else "never seen"), "-"
        else:
            shown = "missing" if state.missing else state.status
            seen = f"{now - state.last_seen:.0f} s ago"
        rows.append(
            [
                info.site if info else state.site,
                device_id,
                info.kind if info else "?",
                shown,
                seen,
                telemetry.get("version", "-"),
                telemetry.get("config_version", "-"),
                "yes" if telemetry.get("safe_mode") else ("no" if telemetry else "-"),
                telemetry.get("outbox_depth", "-"),
                telemetry.get("cpu_temperature_c", "-"),
                clock_shown(state),
                ",".join(map(str, outstanding.get(device_id, []))) or "-",
                "yes" if info else "NOT ENROLLED",
            ]
        )
    if args.json:
        keys = ["site", "device", "kind", "state", "last_seen", "version", "config_version", "safe_mode"]
        keys += ["outbox_depth", "temperature_c"]
        keys += ["clock_off_s", "outstanding", "enrolled"]
        print_json([dict(zip(keys, row, strict=True)) for row in rows])
    else:
        print(
            tabulate(
                rows,
                headers=[
                    "site",
                    "device",
                    "kind",
                    "state",
                    "last seen",
                    "version",
                    "config",
                    "safe mode",
                    "outbox",
                    "temp °C",
                    "clock off",
                    "outstanding seq",
                    "enrolled",
                ],
            )
        )
    return 0


def clock_shown(state) -> str:
    """The device's clock error when it is worth a look (more than the tolerance a device corrects itself within)."""
    if state is None or state.clock_skew_s is None or abs(state.clock_skew_s) < 2:
        return "-"
    return f"{state.clock_skew_s:+.0f} s"


def cmd_receiver_fetch_evidence(args: argparse.Namespace) -> int:
    import os

    from agent.centre.evidence_fetch import fetch
    from agent.centre.keyring import Keyring
    from agent.centre.store import open_store
    from agent.config.centre import load_receiver_config
    from agent.config.secrets import resolve_secret
    from agent.mqtt.link import MqttLink
    from agent.protocol.evidence import EvidenceError
    from agent.protocol.messages import TopicLayout
    from agent.protocol.sealing import load_encryption_key
    from agent.protocol.signing import MessageSigner, load_private_key

    config = load_receiver_config(args.config)
    with open_store(config) as store:
        alerts = [
            m
            for m in store.messages(kind="alert", device=args.device)
            if (m.claims["body"].get("evidence") or {}).get("ref") == args.ref
            or m.claims["body"].get("situation_id") == args.ref
        ]
    if not alerts:
        raise EvidenceError(f"no stored alert from {args.device} names evidence {args.ref!r}")
    alert = alerts[0]
    evidence = alert.claims["body"]["evidence"]
    signer = MessageSigner(load_private_key(resolve_secret(config.receiver.signing_key_file, *config.secret_dirs)))
    decryption_key = load_encryption_key(resolve_secret(config.receiver.encryption_key_file, *config.secret_dirs))
    link = MqttLink(
        config.mqtt,
        client_id=f"receiver-{config.receiver.id}-evidence",
        secret_dirs=config.secret_dirs,
        session_expiry_s=0,
    )
    problem = link.probe(args.timeout)
    if problem:
        raise EvidenceError(problem)
    try:
        data = fetch(
            link,
            TopicLayout(config.mqtt.topic_prefix),
            signer,
            Keyring(config.keyring_path),
            decryption_key,
            site=alert.site,
            device=alert.device,
            ref=evidence["ref"],
            expected_sha256=evidence["sha256"],
            timeout_s=args.timeout,
        )
    finally:
        link.close()
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    print(f"{args.out}: {len(data)} bytes from {alert.site}/{alert.device}, decrypted; sha256 matches the signed alert")
    return 0


def cmd_receiver_init(args: argparse.Namespace) -> int:
    """Create the centre's keys that are missing (``--force``: replace both) and publish the public set."""
    from agent.config.centre import load_receiver_config
    from agent.config.secrets import resolve_secret
    from agent.protocol.sealing import centre_key_set, generate_encryption_key, load_encryption_key
    from agent.protocol.signing import generate_private_key, load_private_key

    config = load_receiver_config(args.config)
    keys = []
    for what, name, generate, load in (
        ("signing", config.receiver.signing_key_file, generate_private_key, load_private_key),
        ("encryption", config.receiver.encryption_key_file, generate_encryption_key, load_encryption_key),
    ):
        path = resolve_secret(name, *config.secret_dirs)
        if path.exists() and not args.force:
            keys.append(load(path))
            print(f"kept the centre's {what} key {path}", file=sys.stderr)
        else:
            keys.append(generate(path, force=args.force))
            print(f"created the centre's {what} key {path} (mode 0600)", file=sys.stderr)
    public = centre_key_set(*keys)
    out = config.receiver.state_dir / "centre.jwk"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(public, indent=2) + "\n")
    print(f"give devices this key set as centre.jwk (also written to {out}):", file=sys.stderr)
    print_json(public)
    return 0


def cmd_receiver_enroll(args: argparse.Namespace) -> int:
    from agent.centre.keyring import Keyring
    from agent.config.centre import load_receiver_config

    config = load_receiver_config(args.config)
    source = sys.stdin if args.record == "-" else None
    where = "standard input" if source else args.record
    try:
        text = source.read() if source else Path(args.record).read_text()
        record = json.loads(text)
    except OSError as exc:
        raise ConfigError(f"cannot read enrolment record {where}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{where} is not JSON: {exc}") from None
    if args.device_id and isinstance(record, dict) and "kty" in record:
        record = {"device_id": args.device_id, "site": args.site, "jwk": record}
    device = Keyring(config.keyring_path).enroll(record, where)
    print(f"enrolled {device.site}/{device.device_id} with key {device.kid}")
    if isinstance(record, dict) and "csr" in record:
        _issue_on_enrolment(config, record, where, args.cert_out)
    return 0


def _issue_on_enrolment(config, record: dict, where: str, cert_out: Path | None) -> None:
    """A record with a CSR gets its broker certificate when the centre keeps a device CA (``ca_dir``)."""
    from agent.centre.ca import CA_KEY, DeviceCA, device_identity, pem_cert

    ca = DeviceCA(config.ca_path)
    if not (ca.directory / CA_KEY).exists():
        print(f"the record has a CSR but there is no device CA in {ca.directory}; not signed", file=sys.stderr)
        return
    name = device_identity(record["site"], record["device_id"])
    cert = ca.issue_for_csr(record["csr"], name, where)
    target = cert_out or ca.directory / "issued" / f"{record['site']}-{record['device_id']}.pem"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(pem_cert(cert))
    print(f"issued {name} serial {cert.serial_number:#x}: {target} (install it as credentials/client-cert.pem)")


# edge-agent centre …: the device CA and the broker configuration it implies.


def _ca_and_prefix(args: argparse.Namespace):
    """The CA directory from ``--ca-dir``, else from the receiver config's ``ca_dir``; the topic prefix likewise."""
    from agent.centre.ca import DeviceCA
    from agent.config.centre import load_receiver_config

    if args.ca_dir is not None:
        return DeviceCA(args.ca_dir), getattr(args, "prefix", None) or "edge"
    if args.config is None:
        raise ConfigError("give --ca-dir DIR or --config RECEIVER.toml (its [receiver] ca_dir)")
    config = load_receiver_config(args.config)
    return DeviceCA(config.ca_path), getattr(args, "prefix", None) or config.mqtt.topic_prefix


def cmd_centre_ca_init(args: argparse.Namespace) -> int:
    ca, _ = _ca_and_prefix(args)
    cert = ca.init(name=args.name, force=args.force)
    print(f"created the device CA in {ca.directory} (key mode 0600), serial {cert.serial_number:#x}; CRL {ca.crl_path}")
    return 0


def _read_record(source: str) -> dict:
    where = "standard input" if source == "-" else source
    try:
        record = json.loads(sys.stdin.read() if source == "-" else Path(source).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read enrolment record {where}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{where} is not JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("csr"), str):
        raise ConfigError(f"{where}: no 'csr' in the record (provision the device with --csr)")
    return record


def cmd_centre_ca_issue(args: argparse.Namespace) -> int:
    from agent.centre.ca import device_identity, pem_cert

    ca, _ = _ca_and_prefix(args)
    record = _read_record(args.record)
    name = device_identity(record.get("site"), record.get("device_id"))
    cert = ca.issue_for_csr(record["csr"], name, args.record, days=args.days)
    pem = pem_cert(cert)
    if args.out is None:
        sys.stdout.write(pem.decode())
    else:
        Path(args.out).write_bytes(pem)
    print(
        f"issued {name} serial {cert.serial_number:#x} until {cert.not_valid_after_utc:%Y-%m-%d}; "
        "install it on the device as credentials/client-cert.pem, then 'edge-agent config credentials'",
        file=sys.stderr,
    )
    return 0


def cmd_centre_ca_revoke(args: argparse.Namespace) -> int:
    ca, _ = _ca_and_prefix(args)
    for entry in ca.revoke(args.which):
        print(f"revoked {entry.name} serial {entry.serial:#x}")
    print(f"wrote {ca.crl_path}; mosquitto reads it at start: restart the broker", file=sys.stderr)
    return 0


def cmd_centre_ca_crl(args: argparse.Namespace) -> int:
    ca, _ = _ca_and_prefix(args)
    crl = ca.write_crl()
    print(f"wrote {ca.crl_path}, valid until {crl.next_update_utc:%Y-%m-%d}; restart the broker to load it")
    return 0


def cmd_centre_broker_config(args: argparse.Namespace) -> int:
    from agent.centre.ca import write_broker_config

    ca, prefix = _ca_and_prefix(args)
    conf = write_broker_config(
        ca,
        args.out,
        prefix=prefix,
        receiver_name=args.receiver_name,
        hosts=tuple(args.host or ["localhost"]),
        port=args.port,
    )
    print(f"wrote {conf}, acl, server, receiver and enrolment (bootstrap) certificates in {args.out}")
    print(
        f"the receiver connects with tls cert_file {Path(args.out) / 'receiver.pem'}, "
        f"key_file {Path(args.out) / 'receiver-key.pem'}; mosquitto must be able to read server-key.pem",
        file=sys.stderr,
    )
    return 0


# edge-agent centre console / user …: the operators' web console and its accounts.


def cmd_centre_console(args: argparse.Namespace) -> int:
    from agent.config.centre import load_receiver_config
    from agent.console.server import Console

    console = Console(load_receiver_config(args.config), listen=args.listen)
    host, port = console.address
    print(f"console on http://{host}:{port}/ (stop with Ctrl-C)", file=sys.stderr)
    # uvicorn handles SIGINT/SIGTERM while it runs, then passes the signal on to these: a clean exit 0.
    stop_on_signals(lambda: None)
    try:
        console.serve()
    finally:
        console.close()
    return 0


def _read_new_password(args: argparse.Namespace) -> str:
    """From --password-file (first line), else asked twice on the terminal; never from the command line."""
    import getpass

    if args.password_file is not None:
        try:
            lines = Path(args.password_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.password_file}: {exc.strerror}") from None
        password = lines[0] if lines else ""
    else:
        password = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the two passwords differ; nothing changed")
    if len(password) < 10:
        raise ConfigError("a password needs at least 10 characters; nothing changed")
    return password


def cmd_centre_user_add(args: argparse.Namespace) -> int:
    import re
    import time

    from agent.centre.store import open_store
    from agent.config.centre import load_receiver_config
    from agent.console.auth import hash_password
    from agent.console.state import ConsoleState

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", args.name):
        raise ConfigError(
            f"{args.name!r}: a name is 1-64 letters, digits and . _ @ - (starting with a letter or digit)"
        )
    config = load_receiver_config(args.config)
    password_hash = hash_password(_read_new_password(args))
    with open_store(config) as store:
        done = ConsoleState(store).add_operator(args.name, password_hash, args.role, time.time(), replace=args.replace)
    if not done:
        raise ConfigError(f"an account {args.name!r} exists; give --replace to set its password and role")
    print(f"{'updated' if args.replace else 'added'} {args.role} {args.name}")
    return 0


def cmd_centre_config_push(args: argparse.Namespace) -> int:
    """Sign a configuration document and publish it, retained, to each selected device's config topic."""
    import time

    from agent.centre.config_push import PushBook, push, read_document, select
    from agent.centre.keyring import Keyring
    from agent.protocol.messages import TopicLayout

    config = _centre_config(args, "centre config push")
    document = read_document(args.file)
    selection = select(Keyring(config.keyring_path).devices(), args.device, args.site, args.group)
    signer = _centre_signer(config)
    book = PushBook(config.receiver.state_dir)
    now = time.time()
    version = args.version if args.version is not None else book.next_version(selection.devices, now)
    link = _centre_link(config, "config", args.timeout)
    try:
        topics = push(
            link,
            TopicLayout(config.mqtt.topic_prefix),
            signer,
            selection,
            document,
            version=version,
            expires_in_s=args.expires_in * 3600,
            gate_s=args.gate,
            timeout_s=args.timeout,
        )
    finally:
        link.close()
    book.record(selection.devices, version, selection.selector, str(args.file), now)
    _print_published(
        f"pushed {args.file} as version {version} ({selection.selector})", topics, "applied / rejected / rolled_back"
    )
    return 0


def cmd_centre_update_publish(args: argparse.Namespace) -> int:
    """Sign an update manifest for each device in the stage and publish it, retained, on its update topic."""
    import time

    from agent.centre.config_push import publish_retained
    from agent.centre.keyring import Keyring
    from agent.centre.update_publish import describe_artefact, manifests, record, staged
    from agent.protocol.messages import TopicLayout
    from agent.protocol.update_manifest import sign_manifest

    config = _centre_config(args, "centre update publish")
    devices = args.devices.split(",") if args.devices else None
    chosen = staged(Keyring(config.keyring_path).devices(), args.stage, devices)
    artefact = describe_artefact(args.artefact)
    url = args.url or args.artefact.resolve().as_uri()
    stage = {"stage_percent": args.stage} if args.stage is not None else {"stage_devices": devices}
    signer = _centre_signer(config)
    layout, now = TopicLayout(config.mqtt.topic_prefix), time.time()
    extra = {"min_config_schema": args.min_config_schema, "gate_s": args.gate}
    try:
        signed = [
            (
                layout.topic(device.site, device.device_id, "update"),
                sign_manifest(signer, now=now, expires_in_s=args.expires_in * 3600, **fields, **extra),
            )
            for device, fields in manifests(chosen, artefact, version=args.version, url=url, **stage)
        ]
    except ValueError as exc:  # pydantic's: a version or URL the manifest cannot carry
        raise ConfigError(f"update manifest: {exc}") from None
    link = _centre_link(config, "update", args.timeout)
    try:
        topics = publish_retained(link, signed, args.timeout)
    finally:
        link.close()
    record(config.receiver.state_dir, chosen, {"version": args.version, "url": url, **artefact, **stage}, now)
    what = f"published version {args.version} ({artefact['sha256'][:12]}…)"
    _print_published(what, topics, "installed / rolled_back / refused", event="software_update")
    return 0


def _print_published(what: str, topics: list[str], outcomes: str, event: str = "config_update") -> None:
    """What went out, retained, to which device topics; and (on stderr) how the devices will answer."""
    print(f"{what} to {len(topics)} device(s), retained:")
    for topic in topics:
        print(f"  {topic}")
    print(f"each device reports {outcomes} in a {event} event", file=sys.stderr)


def cmd_centre_command(args: argparse.Namespace) -> int:
    """Send one signed, single-use command to a device and print its signed answer."""
    from agent.centre.commands import send_command
    from agent.centre.keyring import Keyring
    from agent.protocol.messages import TopicLayout

    config = _centre_config(args, "centre command")
    enrolled = {d.device_id: d for d in Keyring(config.keyring_path).devices()}
    if args.device not in enrolled:
        raise ConfigError(f"device {args.device!r} is not enrolled")
    signer = _centre_signer(config)
    link = _centre_link(config, "command", args.timeout)
    try:
        answer = send_command(
            link,
            TopicLayout(config.mqtt.topic_prefix),
            signer,
            enrolled[args.device],
            args.command,
            lifetime_s=args.lifetime,
            timeout_s=args.timeout,
            state_dir=config.receiver.state_dir,
        )
        if args.command == "snapshot" and answer.get("outcome") == "done" and args.out is not None:
            _fetch_snapshot(link, config, enrolled[args.device], answer["result"]["evidence"], args.out, args.timeout)
    finally:
        link.close()
    print_json(answer)
    return 0 if answer.get("outcome") == "done" else 1


def _fetch_snapshot(link, config, device, evidence: dict, out: Path, timeout_s: float) -> None:
    """Fetch a snapshot the way evidence is fetched: a signed request, the JPEG sealed for the centre."""
    import os

    from agent.centre.evidence_fetch import fetch
    from agent.centre.keyring import Keyring
    from agent.config.secrets import resolve_secret
    from agent.protocol.messages import TopicLayout
    from agent.protocol.sealing import load_encryption_key
    from agent.protocol.signing import MessageSigner, load_private_key

    data = fetch(
        link,
        TopicLayout(config.mqtt.topic_prefix),
        MessageSigner(load_private_key(resolve_secret(config.receiver.signing_key_file, *config.secret_dirs))),
        Keyring(config.keyring_path),
        load_encryption_key(resolve_secret(config.receiver.encryption_key_file, *config.secret_dirs)),
        site=device.site,
        device=device.device_id,
        ref=str(evidence["ref"]),
        expected_sha256=str(evidence["sha256"]),
        timeout_s=timeout_s,
    )
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    print(f"{out}: {len(data)} bytes, redacted on the device, decrypted here; sha256 matches", file=sys.stderr)


def _centre_config(args: argparse.Namespace, what: str):
    """The receiver config a centre command works from: the centre's key, its broker and its keyring."""
    from agent.config.centre import load_receiver_config

    if args.config is None:
        raise ConfigError(f"{what}: --config RECEIVER.toml is required (the centre's key and broker)")
    return load_receiver_config(args.config)


def _centre_signer(config):
    """The centre's signing key (the receiver's), loaded as the receiver loads it."""
    from agent.config.secrets import secret_file
    from agent.protocol.signing import MessageSigner, load_private_key

    return MessageSigner(
        load_private_key(secret_file(config.receiver.signing_key_file, config.secret_dirs, "receiver.signing_key_file"))
    )


def _centre_link(config, purpose: str, timeout_s: float):
    """A short MQTT session as the receiver's identity, proved to connect before anything is signed and sent."""
    from agent.errors import UplinkError
    from agent.mqtt.link import MqttLink

    link = MqttLink(
        config.mqtt,
        client_id=f"receiver-{config.receiver.id}-{purpose}",
        secret_dirs=config.secret_dirs,
        session_expiry_s=0,
    )
    problem = link.probe(timeout_s)
    if problem:
        raise UplinkError(problem)
    return link
