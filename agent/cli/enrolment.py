"""Zero-touch enrolment commands: ``centre token create``, ``centre enrolments list|approve|reject``, ``enrol-first-boot``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from agent.cli.output import print_json
from agent.errors import ConfigError

#: A token is valid this long unless --expires-in says otherwise (hours): long enough for a rollout week.
DEFAULT_EXPIRY_H = 168.0
#: Where the installer puts the enrolment file: the Pi's boot partition (FAT, writable from any PC).
DEFAULT_FILE = Path("/boot/firmware/edge-agent-enrol.toml")


def add_centre_commands(sub: argparse._SubParsersAction) -> None:
    token = sub.add_parser("token", help="one-time enrolment tokens for installers (zero-touch enrolment)")
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = token_sub.add_parser("create", help="make tokens; only their hashes are kept, so note them now")
    create.add_argument("--config", type=Path, required=True, help="receiver config file")
    create.add_argument("--site", required=True)
    create.add_argument("--kind", required=True, choices=["call-point", "building-button", "camera-box"])
    create.add_argument("--count", type=int, default=1, help="how many tokens (one per card)")
    create.add_argument("--expires-in", type=float, default=DEFAULT_EXPIRY_H, help="hours each token stays valid")
    create.add_argument(
        "--approve", choices=["auto", "operator"], default="auto", help="enrol at once, or queue for an operator"
    )
    create.set_defaults(func=cmd_token_create)

    enrolments = sub.add_parser("enrolments", help="enrolment requests: list, approve ID, reject ID")
    enrol_sub = enrolments.add_subparsers(dest="enrol_command", metavar="ACTION", required=True)
    listing = enrol_sub.add_parser("list", help="requests (default: pending ones; --all for every one)")
    listing.add_argument("--config", type=Path, required=True)
    listing.add_argument("--all", action="store_true")
    listing.set_defaults(func=cmd_enrolments_list)
    for action, func in (("approve", cmd_enrolments_approve), ("reject", cmd_enrolments_reject)):
        parser = enrol_sub.add_parser(action, help=f"{action} a pending request")
        parser.add_argument("id", type=int)
        parser.add_argument("--config", type=Path, required=True)
        if action == "reject":
            parser.add_argument("--reason", default="rejected by an operator")
        parser.set_defaults(func=func)


def add_device_command(commands: argparse._SubParsersAction) -> None:
    boot = commands.add_parser("enrol-first-boot", help="enrol this box with the token in its enrolment file")
    boot.add_argument("--file", type=Path, default=DEFAULT_FILE, help=f"the enrolment file (default {DEFAULT_FILE})")
    boot.add_argument("--root", type=Path, default=Path("/"), help="install under this root (default /)")
    boot.add_argument("--timeout", type=float, default=3600, help="seconds to keep asking (an operator may approve)")
    boot.add_argument("--retry", type=float, default=30, help="seconds between requests")
    boot.set_defaults(func=cmd_enrol_first_boot)


def _book(config_path: Path):
    from agent.centre.enrolment_tokens import TokenBook
    from agent.centre.store import open_store
    from agent.config.centre import load_receiver_config

    config = load_receiver_config(config_path)
    return config, TokenBook(open_store(config))


def cmd_token_create(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= 10000:
        raise ConfigError("--count: 1 to 10000 tokens at a time")
    if not 0 < args.expires_in <= 24 * 366:
        raise ConfigError("--expires-in: more than 0 and at most a year, in hours")
    _, book = _book(args.config)
    now = time.time()
    with book.store:
        tokens = book.create(args.site, args.kind, args.count, now + args.expires_in * 3600, args.approve, now)
    print(
        f"{len(tokens)} token(s) for {args.kind} at {args.site}, valid {args.expires_in:g} h, approve {args.approve}; "
        'put one in each card\'s edge-agent-enrol.toml as token = "..." (the centre keeps only hashes)',
        file=sys.stderr,
    )
    for token in tokens:
        print(token)
    return 0


def cmd_enrolments_list(args: argparse.Namespace) -> int:
    _, book = _book(args.config)
    with book.store:
        rows = book.requests(None if args.all else "pending")
    print_json(
        [
            {"id": r.id, "state": r.state, "site": r.site, "device": r.device, "kind": r.kind, "kid": r.kid,
             "client_id": r.client_id, "requested_at": r.requested_at, "reason": r.reason, "csr": r.csr is not None}
            for r in rows
        ]
    )  # fmt: skip
    return 0


def cmd_enrolments_approve(args: argparse.Namespace) -> int:
    from agent.centre.enrolment_desk import approve
    from agent.centre.keyring import Keyring

    config, book = _book(args.config)
    with book.store:
        decision = approve(book, Keyring(config.keyring_path), config.ca_path, args.id, time.time())
    if decision.outcome != "enrolled":
        print(f"request {args.id} could not be enrolled: {decision.detail}", file=sys.stderr)
        return 1
    print(f"approved request {args.id}: enrolled; the device learns it when it next asks")
    return 0


def cmd_enrolments_reject(args: argparse.Namespace) -> int:
    from agent.centre.enrolment_desk import reject

    _, book = _book(args.config)
    with book.store:
        reject(book, args.id, args.reason[:200], time.time())
    print(f"rejected request {args.id}; its token cannot be used again")
    return 0


def cmd_enrol_first_boot(args: argparse.Namespace) -> int:
    from agent.install.first_boot import first_boot

    outcome = first_boot(args.file, args.root, timeout_s=args.timeout, retry_s=args.retry)
    if outcome.outcome == "nothing_to_do":
        print(outcome.detail, file=sys.stderr)
        return 0
    if outcome.outcome == "enrolled":
        print(f"enrolled {outcome.device_id}; the token is removed from {args.file}")
        return 0
    print(f"enrolment refused ({outcome.reason}): {outcome.detail}", file=sys.stderr)
    return 1
