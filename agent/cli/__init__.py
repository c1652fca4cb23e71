"""The ``edge-agent`` command line.

Exit codes: 0 success, 1 the operation failed, 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from agent import __version__
from agent.cli.centre import (
    cmd_centre_broker_config,
    cmd_centre_ca_crl,
    cmd_centre_ca_init,
    cmd_centre_ca_issue,
    cmd_centre_ca_revoke,
    cmd_centre_command,
    cmd_centre_config_push,
    cmd_centre_console,
    cmd_centre_update_publish,
    cmd_centre_user_add,
    cmd_receiver_devices,
    cmd_receiver_enroll,
    cmd_receiver_fetch_evidence,
    cmd_receiver_init,
    cmd_receiver_run,
)
from agent.cli.enrolment import add_centre_commands as add_enrolment_commands
from agent.cli.enrolment import add_device_command as add_first_boot_command
from agent.cli.forwarders import cmd_receiver_forwarders
from agent.cli.output import print_json, stop_on_signals
from agent.errors import AgentError, ConfigError, ModelError

log = logging.getLogger("edge-agent")


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (journald's pipe, or a caller's redirection), not at setup."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(level: str, fmt: str) -> None:
    handler = StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    # Neither format shows where a line was logged from, nor its thread or process: skip finding them out
    # (a frame walk per record; the logging HOWTO's "Optimization"), as a receiver logs every alert.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def cmd_config_check(args: argparse.Namespace) -> int:
    from agent.config.centre import load_receiver_config
    from agent.config.device import load_agent_config

    loader = load_receiver_config if args.receiver else load_agent_config
    try:
        config = loader(args.file)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    what = "receiver" if args.receiver else f"{config.device.kind} {config.device.site}/{config.device.id}"
    print(f"{args.file}: valid ({what})")
    if not args.receiver and config.camera is not None:
        from hw.camera import backend_for, redact_url

        backend, problem = backend_for(config.camera.source)
        state = "available" if problem is None else f"not available here: {problem}"
        print(f"camera {redact_url(config.camera.source)}: {backend} backend, {state}")
    return 0


def cmd_config_credentials(args: argparse.Namespace) -> int:
    from agent.config.centre import load_receiver_config
    from agent.config.device import load_agent_config
    from agent.install.provisioning import reload_systemd, write_credentials_dropin

    config = load_receiver_config(args.file) if args.receiver else load_agent_config(args.file)
    unit = "edge-agent-receiver.service" if args.receiver else "edge-agent.service"
    path, listed, left_out = write_credentials_dropin(config, unit, args.unit_dir)
    print(f"wrote {path}: LoadCredential= for {', '.join(listed) or 'nothing'}")
    for line in left_out:
        print(f"not passed in: {line}", file=sys.stderr)
    problem = reload_systemd(args.unit_dir)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


def cmd_keys_init(args: argparse.Namespace) -> int:
    from agent.config.device import load_agent_config
    from agent.config.secrets import resolve_secret
    from agent.protocol.enrolment import enrolment_record
    from agent.protocol.signing import generate_private_key

    config = load_agent_config(args.config)
    path = resolve_secret(config.identity.private_key_file, *config.secret_dirs)
    key = generate_private_key(path, force=args.force)
    print(f"created device key {path} (mode 0600)", file=sys.stderr)
    print_json(enrolment_record(config.device.id, config.device.site, config.device.kind, key))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import threading

    from agent.device.agent import Agent
    from agent.device.safe_mode import load_for_start
    from agent.device.software_update import launch, relaunch

    launch(load_for_start(args.config, agent=False).config.state_dir, sys.argv[1:])  # the version `current` names
    pin_factory = None
    if args.mock_pins:
        from gpiozero.pins.mock import MockFactory

        pin_factory = MockFactory()
    stop = threading.Event()
    running: list[Agent] = []

    def stop_agent() -> None:
        stop.set()
        for agent in running:
            agent.close()

    stop_on_signals(stop_agent)
    while not stop.is_set():  # again when a pushed change needs a restart (the agent stops itself for it)
        starting = load_for_start(args.config)  # a file that does not validate: safe mode, buttons still working
        agent = Agent(starting.config, pin_factory=pin_factory, starting=starting, restartable=True)
        running[:] = [agent]
        agent.start()
        if stop.is_set():  # a signal came while it was starting
            agent.close()
        agent.wait()
        if agent.relaunch_requested and not stop.is_set():
            relaunch()  # a software update switched versions (or switched back): exec, same process id
        if not agent.restart_requested:
            break
    return 0


def _socket_of(args: argparse.Namespace) -> Path:
    from agent.device.safe_mode import load_for_start

    return load_for_start(args.config, agent=False).config.control_socket  # in safe mode too


def cmd_status(args: argparse.Namespace) -> int:
    from agent.device.control import request

    reply = request(_socket_of(args), "status")
    reply.pop("ok", None)
    print_json(reply)
    return 0


def cmd_test_alert(args: argparse.Namespace) -> int:
    from agent.device.control import request

    arguments = {"button": args.button} if args.button else {}
    reply = request(_socket_of(args), "test-alert", **arguments)
    print(
        f"test alert seq {reply['seq']} from button {reply['button']!r} accepted; "
        f"watch the LED for the centre's acknowledgement"
    )
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from agent.install.detect import run_detect

    if args.every < 1 or args.max_frames < 1:
        raise ConfigError("--every and --max-frames must be at least 1")
    return run_detect(
        args.file, args.config, args.model, args.model_dir, args.threshold, args.annotate, args.max_frames, args.every
    )


def cmd_provision(args: argparse.Namespace) -> int:
    from agent.install.provisioning import ProvisionRequest, provision, qr_text

    request = ProvisionRequest(
        device_id=args.device_id,
        site=args.site,
        kind=args.kind,
        broker=args.broker,
        root=args.root,
        location=args.location,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        username=args.username,
        password_file=args.password_file,
        centre_key=args.centre_key,
        camera=args.camera,
        force=args.force,
        csr=args.csr,
        lat=args.lat,
        lon=args.lon,
        plan=args.plan,
        plan_x=args.plan_x,
        plan_y=args.plan_y,
    )
    record, config_path = provision(request)
    print(
        f"wrote {config_path} and the service's credentials drop-in; device key created (mode 0600). "
        "Enrol this device at the centre:",
        file=sys.stderr,
    )
    print_json(record)
    if not args.no_qr:
        print(qr_text(record), file=sys.stderr)
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from agent.install.selftest import SelfTest

    pin_factory = None
    if args.mock_pins:
        from gpiozero.pins.mock import MockFactory

        pin_factory = MockFactory()
    test = SelfTest(
        args.config,
        pin_factory=pin_factory,
        interactive=args.interactive,
        timeout_s=args.timeout,
        say=lambda text: print(text, file=sys.stderr),
    )
    checks = test.run()
    if args.json:
        print_json([c.as_dict() for c in checks])
    else:
        for check in checks:
            print(check.line())
    failed = [c for c in checks if not c.ok]
    if not args.json:
        print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from agent.install.detect import run_snapshot

    return run_snapshot(args.config, args.out, detect=not args.no_detect)


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model_dir is not None:
        return args.model_dir
    if args.config is not None:
        from agent.config.device import load_agent_config

        return load_agent_config(args.config).model_dir
    return Path("/var/lib/edge-agent/models")


def cmd_models_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from models import load_manifest
    from models.fetch import verify_all

    specs = list(load_manifest().values())
    rows = [
        [
            s.name,
            s.family,
            f"{s.input_size[0]}x{s.input_size[1]}",
            s.licence + (" (test only)" if s.test_only else ""),
            state,
            s.description,
        ]
        for s, state in verify_all(specs, _model_dir(args))
    ]
    print(tabulate(rows, headers=["name", "family", "input", "licence", f"in {_model_dir(args)}", "about"]))
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from models import find_model
    from models.fetch import fetch_model

    path = fetch_model(find_model(args.name), _model_dir(args), url=args.source, progress=sys.stderr.isatty())
    print(f"{args.name}: installed {path} (sha256 verified)")
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    from models import load_manifest
    from models.fetch import verify_all

    results = verify_all(list(load_manifest().values()), _model_dir(args))
    needed = _needed_models(args)
    for spec, state in results:
        print(f"{'✓' if state == 'ok' else '✗'} {spec.name}: {state}{' (needed)' if spec.name in needed else ''}")
    wanted = [r for r in results if r[1] != "missing" or r[0].name in needed]
    return 0 if all(state == "ok" for _, state in wanted) else 1


def _needed_models(args: argparse.Namespace) -> set[str]:
    """The detector and the face model the config names (the defaults without one); others may be absent."""
    from agent.config.vision import DetectorSection, EvidenceSection

    if args.config is None:
        return {DetectorSection().model, EvidenceSection().face_model}
    from agent.config.device import load_agent_config

    vision = load_agent_config(args.config).vision_config()
    return set() if vision is None else {vision.detector.model, vision.evidence.face_model}


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo.run import run_demo

    if not args.log_level_given:  # the demo prints its own story; keep the logs to what goes wrong
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("agent.centre.receiver").setLevel(logging.ERROR)
    if args.seconds < 0:
        raise ConfigError("--seconds must not be negative")
    return run_demo(seconds=args.seconds, video=args.video, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default: info")
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_config_commands(commands)
    _add_device_commands(commands)
    _add_receiver_commands(commands)
    _add_centre_commands(commands)
    _add_install_commands(commands)
    _add_model_commands(commands)
    _add_demo_command(commands)
    return parser


def _add_config_commands(commands: argparse._SubParsersAction) -> None:
    """The ``config`` command: check a file, write the credentials drop-in."""
    config = commands.add_parser("config", help="check a configuration file").add_subparsers(dest="sub", required=True)
    check = config.add_parser("check", help="validate a config file; exit 2 with every problem listed")
    check.add_argument("file", type=Path)
    check.add_argument("--receiver", action="store_true", help="the file is a receiver config")
    check.set_defaults(func=cmd_config_check)
    credentials = config.add_parser(
        "credentials", help="write the unit's LoadCredential= drop-in: the credentials FILE names that exist"
    )
    credentials.add_argument("file", type=Path)
    credentials.add_argument("--receiver", action="store_true", help="the file is a receiver config")
    credentials.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"), help="systemd unit dir")
    credentials.set_defaults(func=cmd_config_credentials)


def _add_device_commands(commands: argparse._SubParsersAction) -> None:
    """What runs on a device: its key, the agent, status and test alerts."""
    keys = commands.add_parser("keys", help="device identity").add_subparsers(dest="sub", required=True)
    init = keys.add_parser("init", help="create the device key and print its enrolment record")
    init.add_argument("--config", type=Path, required=True)
    init.add_argument("--force", action="store_true", help="replace an existing key (the centre must re-enrol)")
    init.set_defaults(func=cmd_keys_init)

    run = commands.add_parser("run", help="run the agent")
    run.add_argument("--config", type=Path, required=True)
    run.add_argument("--mock-pins", action="store_true", help="use gpiozero's mock pins (no hardware)")
    run.set_defaults(func=cmd_run)

    status = commands.add_parser("status", help="ask the running agent for its state")
    status.add_argument("--config", type=Path, required=True)
    status.set_defaults(func=cmd_status)

    test = commands.add_parser("test-alert", help="send a test alert through the real alert path")
    test.add_argument("--config", type=Path, required=True)
    test.add_argument("--button", help="button name (default: the first)")
    test.set_defaults(func=cmd_test_alert)


def _add_receiver_commands(commands: argparse._SubParsersAction) -> None:
    """The centre's receiver and its subcommands."""
    receiver = commands.add_parser("receiver", help="the centre's reference receiver (default: run it)")
    receiver.add_argument("--config", type=Path, help="receiver config file (also accepted after SUBCOMMAND)")
    receiver.set_defaults(func=cmd_receiver_run)
    sub = receiver.add_subparsers(dest="sub", metavar="SUBCOMMAND")
    # --config may come before or after the subcommand; SUPPRESS keeps a value given before.
    config_after = argparse.ArgumentParser(add_help=False)
    config_after.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    sub.add_parser("run", parents=[config_after], help="verify, store and acknowledge device messages").set_defaults(
        func=cmd_receiver_run
    )
    rinit = sub.add_parser(
        "init", parents=[config_after], help="create the centre's signing and encryption keys, print their public set"
    )
    rinit.add_argument("--force", action="store_true")
    rinit.set_defaults(func=cmd_receiver_init)
    devices = sub.add_parser("devices", parents=[config_after], help="the fleet: state, last seen, health")
    devices.add_argument("--json", action="store_true")
    devices.set_defaults(func=cmd_receiver_devices)
    forwarders = sub.add_parser(
        "forwarders", parents=[config_after], help="alarm receiving centres: connected, queue, last ACK/NAK, fault"
    )
    forwarders.add_argument("--json", action="store_true")
    forwarders.set_defaults(func=cmd_receiver_forwarders)
    evidence = sub.add_parser(
        "fetch-evidence", parents=[config_after], help="ask a device for the evidence image of one of its alerts"
    )
    evidence.add_argument("--device", required=True)
    evidence.add_argument("ref", help="the alert's evidence ref (evidence/….jpg) or its situation id")
    evidence.add_argument("--out", type=Path, required=True)
    evidence.add_argument("--timeout", type=float, default=15.0)
    evidence.set_defaults(func=cmd_receiver_fetch_evidence)
    enroll = sub.add_parser(
        "enroll", parents=[config_after], help="enrol a device from its enrolment record (JSON file or -)"
    )
    enroll.add_argument("record")
    enroll.add_argument("--device-id", help="with a bare JWK: the device it belongs to")
    enroll.add_argument("--site", help="with a bare JWK: the device's site")
    enroll.add_argument(
        "--cert-out", type=Path, help="with a CSR in the record and a device CA: where to write the certificate"
    )
    enroll.set_defaults(func=cmd_receiver_enroll)


def _add_centre_commands(commands: argparse._SubParsersAction) -> None:
    """The centre's device CA and the mosquitto configuration for one identity per device."""
    centre = commands.add_parser("centre", help="the centre's device CA, broker configuration, console and accounts")
    sub = centre.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)

    def with_ca(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--ca-dir", type=Path, help="the CA directory (default: the receiver config's ca_dir)")
        parser.add_argument("--config", type=Path, help="receiver config file naming the CA directory")
        return parser

    ca = sub.add_parser("ca", help="the device CA: init, issue, revoke, crl")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    init = with_ca(ca_sub.add_parser("init", help="create the CA key (0600), certificate and an empty CRL"))
    init.add_argument("--name", default="edge-agent device CA", help="the CA's common name")
    init.add_argument("--force", action="store_true", help="replace an existing CA (every certificate dies)")
    init.set_defaults(func=cmd_centre_ca_init)
    issue = with_ca(ca_sub.add_parser("issue", help="sign the CSR of an enrolment record ('provision --csr')"))
    issue.add_argument("record", help="enrolment record JSON with 'csr' ('-' = standard input)")
    issue.add_argument("--out", type=Path, help="certificate file to write (default: standard output)")
    issue.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    issue.set_defaults(func=cmd_centre_ca_issue)
    revoke = with_ca(ca_sub.add_parser("revoke", help="revoke by serial or by name 'site/device'; rewrites the CRL"))
    revoke.add_argument("which", help="serial (decimal or 0x-hex) or certificate name site/device")
    revoke.set_defaults(func=cmd_centre_ca_revoke)
    crl = with_ca(ca_sub.add_parser("crl", help="write the CRL again (it is valid 365 days)"))
    crl.set_defaults(func=cmd_centre_ca_crl)

    broker = with_ca(sub.add_parser("broker-config", help="mosquitto.conf + ACL + server and receiver certificates"))
    broker.add_argument("--out", type=Path, required=True, help="directory to write into")
    broker.add_argument("--host", action="append", default=None, help="broker name/address for its certificate")
    broker.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    broker.add_argument("--prefix", help="topic prefix (default: the receiver config's, else 'edge')")
    broker.add_argument("--receiver-name", default="centre-receiver", help="the receiver's certificate name")
    broker.set_defaults(func=cmd_centre_broker_config)

    console = sub.add_parser("console", help="the operators' web console (alert queue, handling, fleet)")
    console.add_argument("--config", type=Path, required=True, help="the receiver's config (its [console] section)")
    console.add_argument("--listen", help='"host:port" instead of [console] listen')
    console.set_defaults(func=cmd_centre_console)
    user = sub.add_parser("user", help="the console's operator accounts")
    user_sub = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = user_sub.add_parser("add", help="create an account (password asked twice, or --password-file)")
    add.add_argument("name", help="the operator's login name")
    add.add_argument("--role", choices=["operator", "supervisor", "installer"], default="operator")
    add.add_argument("--config", type=Path, required=True, help="the receiver's config (its database)")
    add.add_argument("--password-file", type=Path, help="read the password from this file's first line")
    add.add_argument("--replace", action="store_true", help="set the password and role of an existing account")
    add.set_defaults(func=cmd_centre_user_add)
    config = sub.add_parser("config", help="push a signed configuration to devices")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    push = config_sub.add_parser("push", help="sign FILE (device TOML or a part of it) and publish it, retained")
    push.add_argument("file", type=Path, help="TOML: the whole device config or some sections (zones, rules, …)")
    push.add_argument("--config", type=Path, help="receiver config file (the centre's key, broker and keyring)")
    target = push.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="one device id")
    target.add_argument("--site", help="every enrolled device of a site")
    target.add_argument("--group", help="every enrolled device of a kind (call-point, building-button, camera-box)")
    push.add_argument("--version", type=int, help="default: time in ms, above any version pushed before")
    push.add_argument("--expires-in", type=float, default=720, help="hours the push stays valid (default 720)")
    push.add_argument("--gate", type=float, default=60, help="seconds for the device's test alert to be acknowledged")
    push.add_argument("--timeout", type=float, default=15, help="seconds to wait for the broker")
    push.set_defaults(func=cmd_centre_config_push)

    update = sub.add_parser("update", help="staged software updates of the agent")
    update_sub = update.add_subparsers(dest="update_command", metavar="ACTION", required=True)
    publish = update_sub.add_parser("publish", help="sign an update manifest and publish it, retained, to a stage")
    publish.add_argument("--version", required=True, help="the artefact's edge-agent version (newer than the fleet's)")
    publish.add_argument("--artefact", type=Path, required=True, help="a wheel or sdist of edge-agent")
    publish.add_argument("--url", help="where devices fetch it (https://, http://); default: the file's file:// URL")
    stage = publish.add_mutually_exclusive_group(required=True)
    stage.add_argument("--stage", type=float, metavar="PERCENT", help="this share of devices (chosen by id hash)")
    stage.add_argument("--devices", metavar="ID,ID", help="these devices")
    publish.add_argument("--min-config-schema", type=int, default=1, help="configuration schema the version needs")
    publish.add_argument("--config", type=Path, help="receiver config file (the centre's key, broker and keyring)")
    publish.add_argument("--expires-in", type=float, default=720, help="hours the manifest stays valid (default 720)")
    publish.add_argument(
        "--gate", type=float, default=60, help="seconds for the device's test alert to be acknowledged"
    )
    publish.add_argument("--timeout", type=float, default=15, help="seconds to wait for the broker")
    publish.set_defaults(func=cmd_centre_update_publish)

    command = sub.add_parser("command", help="a signed, single-use command to one device; prints its signed answer")
    command.add_argument("command", choices=["selftest", "test-alert", "restart", "snapshot"])
    command.add_argument("--device", required=True)
    command.add_argument("--config", type=Path, help="receiver config file (the centre's key, broker and keyring)")
    command.add_argument("--lifetime", type=float, default=60, help="seconds the command stays valid (at most 3600)")
    command.add_argument("--timeout", type=float, default=30, help="seconds to wait for the answer")
    command.add_argument("--out", type=Path, help="snapshot: fetch the redacted JPEG (sealed in transit) to this file")
    command.set_defaults(func=cmd_centre_command)
    add_enrolment_commands(sub)  # centre token create, centre enrolments list|approve|reject


def _add_install_commands(commands: argparse._SubParsersAction) -> None:
    """The installer's tools: provision, selftest, snapshot."""
    prov = commands.add_parser("provision", help="create the device key and config; print the enrolment record")
    prov.add_argument("--device-id", required=True)
    prov.add_argument("--site", required=True)
    prov.add_argument("--kind", required=True, choices=["call-point", "building-button", "camera-box"])
    prov.add_argument("--broker", required=True, help="mqtts://host[:port] (TLS) or mqtt://host[:port]")
    prov.add_argument("--location", default="", help="where the device is mounted, shown at the centre")
    prov.add_argument("--lat", type=float, help="latitude, WGS84 degrees (-90..90), for the centre's map; with --lon")
    prov.add_argument("--lon", type=float, help="longitude, WGS84 degrees (-180..180); with --lat")
    prov.add_argument("--plan", help="name of the site plan that --plan-x/--plan-y are on (default 'site')")
    prov.add_argument("--plan-x", type=float, help="x on the site plan, in the plan's units; with --plan-y")
    prov.add_argument("--plan-y", type=float, help="y on the site plan; with --plan-x")
    prov.add_argument("--ca-file", type=Path, help="CA certificate of the broker")
    prov.add_argument("--cert-file", type=Path, help="client certificate for mutual TLS")
    prov.add_argument("--key-file", type=Path, help="client certificate key for mutual TLS")
    prov.add_argument("--username")
    prov.add_argument("--password-file", type=Path, help="file holding the broker password")
    prov.add_argument("--centre-key", type=Path, help="the centre's public key set (from 'edge-agent receiver init')")
    prov.add_argument("--camera", default="picamera2", help="camera-box: camera source")
    prov.add_argument("--root", type=Path, default=Path("/"), help="install under this root (default /)")
    prov.add_argument("--force", action="store_true", help="replace an existing device key")
    prov.add_argument(
        "--csr",
        action="store_true",
        help="make the broker TLS key here and put a CSR in the record (sign it with 'edge-agent centre ca issue')",
    )
    prov.add_argument("--no-qr", action="store_true", help="do not draw the QR code")
    prov.set_defaults(func=cmd_provision)
    add_first_boot_command(commands)  # enrol-first-boot: zero-touch enrolment from the boot partition

    selftest = commands.add_parser("selftest", help="check every part of this box; exit 1 if any fails")
    selftest.add_argument("--config", type=Path, required=True)
    selftest.add_argument("--json", action="store_true", help="machine-readable results")
    selftest.add_argument("--interactive", action="store_true", help="ask the installer to press each button")
    selftest.add_argument("--mock-pins", action="store_true", help="gpiozero mock pins (no hardware)")
    selftest.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for broker and centre")
    selftest.set_defaults(func=cmd_selftest)

    snapshot = commands.add_parser("snapshot", help="a frame from the camera with zones, masks and detections")
    snapshot.add_argument("--config", type=Path, required=True)
    snapshot.add_argument("--out", type=Path, required=True, metavar="FILE.png")
    snapshot.add_argument("--no-detect", action="store_true", help="only the picture, zones and masks")
    snapshot.set_defaults(func=cmd_snapshot)


def _add_model_commands(commands: argparse._SubParsersAction) -> None:
    """Models (list, fetch, verify) and detect."""
    models = commands.add_parser("models", help="detection models: list, fetch, verify")
    models_sub = models.add_subparsers(dest="sub", required=True)
    model_place = argparse.ArgumentParser(add_help=False)
    model_place.add_argument("--config", type=Path, help="use this device config's detector.model_dir")
    model_place.add_argument("--model-dir", type=Path, help="directory holding the model files")
    models_sub.add_parser(
        "list", parents=[model_place], help="models in the manifest and whether they are here"
    ).set_defaults(func=cmd_models_list)
    fetch = models_sub.add_parser("fetch", parents=[model_place], help="download, verify and install a model")
    fetch.add_argument("name")
    fetch.add_argument("--from", dest="source", help="download from this URL (a mirror, or file://)")
    fetch.set_defaults(func=cmd_models_fetch)
    models_sub.add_parser("verify", parents=[model_place], help="check every installed model's sha256").set_defaults(
        func=cmd_models_verify
    )

    detect = commands.add_parser("detect", help="run the detector on an image or video; JSON lines out")
    detect.add_argument("file", type=Path)
    detect.add_argument("--config", type=Path, help="take model, threshold and zones from this device config")
    detect.add_argument(
        "--model",
        help="model name from the manifest, or a .tflite file (its family and input read from it; "
        "default: the config's, else SSD MobileNet)",
    )
    detect.add_argument("--model-dir", type=Path, help="directory holding the model file")
    detect.add_argument("--threshold", type=float, help="minimum score")
    detect.add_argument("--annotate", type=Path, metavar="OUT.png", help="write the last frame with boxes and zones")
    detect.add_argument("--max-frames", type=int, default=1_000_000)
    detect.add_argument("--every", type=int, default=1, help="process every Nth frame")
    detect.set_defaults(func=cmd_detect)


def _add_demo_command(commands: argparse._SubParsersAction) -> None:
    """The demo."""
    demo = commands.add_parser("demo", help="broker, centre, a call point and a camera box on this machine")
    demo.add_argument("--seconds", type=float, default=20, help="how long the camera box runs (default 20)")
    demo.add_argument("--video", type=Path, help="video for the camera box (default: vtest.avi)")
    demo.add_argument("--out", type=Path, default=Path("edge-demo.png"), help="annotated picture to write")
    demo.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.log_level_given = args.log_level is not None
    args.log_level = args.log_level or "info"
    if args.command == "receiver" and args.config is None:
        parser.error("receiver: --config FILE is required")
    _setup_logging(args.log_level, args.log_format)
    try:
        return args.func(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except (AgentError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
