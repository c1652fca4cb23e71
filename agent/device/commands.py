"""The device's side of the centre's signed commands (see ``agent.protocol.commands``).

Refused: not signed by the centre (``bad_signature``, ``malformed``…), another
device (``device_mismatch``), expired or sent too long ago (``stale``), or an id
run before (``replayed``; ids are remembered on disk until they expire, so a
restart forgets none that could still be used). Taken, on the command's own
thread (never paho's):

- ``selftest``: the running agent's own checks, one row each (its threads, the
  MQTT network thread, the outbox, each button line, the vision process), as a table;
- ``test-alert``: a test alert through the real path, as ``edge-agent test-alert``;
- ``restart``: the agent restarts itself (in ``edge-agent run``), if it can;
- ``snapshot`` (camera boxes taking evidence): the vision process stores its next
  frame exactly as evidence (redacted before encoding; see ``agent.vision.snapshot``);
  the answer carries its reference and sha256, and the centre fetches it sealed.

Every outcome goes back as a signed ``event`` ``{"command": {...}}``; refusals
are reported at most every ``REFUSAL_REPORT_S``, counted always.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from joserfc.jwk import OKPKey

from agent.errors import SignatureInvalid
from agent.protocol.commands import MAX_LIFETIME_S, CommandClaims, open_command
from agent.runtime.files import write_file_atomically
from agent.runtime.guard import LoopGuard

if TYPE_CHECKING:
    from agent.device.agent import Agent

log = logging.getLogger(__name__)

USED_IDS = "commands-used.json"
REFUSAL_REPORT_S = 10.0
#: How long a snapshot may take: the vision process looks for the request twice a second, then stores one frame.
SNAPSHOT_WAIT_S = 10.0
#: A command sent more than this long ago (by the device's corrected clock) is stale, whatever its expiry says.
FUTURE_SLACK_S = 30.0


class CommandRunner:
    """Takes the centre's commands for one agent."""

    def __init__(self, agent: Agent, centre_key: OKPKey, state_dir: Path):
        self._agent = agent
        self._centre_key = centre_key
        self._used_path = Path(state_dir) / "fleet" / USED_IDS
        self._used = self._load_used()
        self._inbox: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._last_refusal_report = -REFUSAL_REPORT_S
        self.counters: Counter[str] = Counter()
        self.guard = LoopGuard("commands", stall_s=3600.0)

    def submit(self, payload: bytes | None) -> None:
        """From paho's thread: queue only; a full queue drops the command (the centre sees no answer)."""
        try:
            self._inbox.put_nowait(payload)
        except queue.Full:
            self.counters["dropped"] += 1

    def start(self) -> None:
        self.guard.start(self._run)

    def close(self) -> None:
        try:
            self._inbox.put(None, timeout=1)
        except queue.Full:
            pass
        self.guard.join(timeout=5)

    def _run(self) -> None:
        while True:
            try:
                payload = self._inbox.get(timeout=1.0)
            except queue.Empty:
                self.guard.beat()
                continue
            self.guard.beat()
            if payload is None:
                return
            with self.guard.step("command"):
                self._handle(payload)

    def _handle(self, token: bytes) -> None:
        try:
            claims = open_command(token, self._centre_key)
        except SignatureInvalid as exc:
            self._refuse(None, exc.reason, str(exc))
            return
        problem = self._problem(claims)
        if problem is not None:
            self._refuse(claims, *problem)
            return
        self._remember(claims)
        log.warning("command %s (%s) from the centre", claims.command, claims.command_id)
        try:
            result = self._execute(claims)
        except Exception as exc:  # noqa: BLE001 - a command that fails is answered, never a dead thread
            self._answer(claims, "failed", reason=f"{type(exc).__name__}: {exc}"[:500])
            return
        self._answer(claims, "done", result=result)
        if claims.command == "restart":
            self._agent.request_restart(f"the centre asked (command {claims.command_id})")

    def _problem(self, claims: CommandClaims) -> tuple[str, str] | None:
        agent = self._agent
        if (claims.device, claims.site) != (agent.device, agent.site):
            return "device_mismatch", f"addressed to {claims.site}/{claims.device}"
        now = agent.clock.now()
        if claims.expires < now or claims.sent < now - MAX_LIFETIME_S or claims.sent > now + FUTURE_SLACK_S:
            return "stale", f"sent {now - claims.sent:+.0f} s ago, expires {claims.expires - now:+.0f} s from now"
        if claims.expires - claims.sent > MAX_LIFETIME_S:
            return "stale", f"valid {claims.expires - claims.sent:.0f} s, more than {MAX_LIFETIME_S:g} s"
        if str(claims.command_id) in self._used:
            return "replayed", f"command {claims.command_id} was run already"
        if claims.command == "restart" and not agent.restartable:
            return "unsupported", "this agent cannot restart itself (not run by 'edge-agent run')"
        if claims.command == "snapshot" and not any(rule.evidence for rule in agent.config.rules):
            return "unsupported", "no snapshot: this device keeps no evidence (no camera rule sets evidence = true)"
        return None

    def _execute(self, claims: CommandClaims) -> dict[str, Any]:
        agent = self._agent
        if claims.command == "selftest":
            return {"checks": self_checks(agent)}
        if claims.command == "test-alert":
            entry = agent.gate_alert(0)
            if entry is None:
                raise RuntimeError("the test alert could not be stored")
            return {"seq": entry.seq, "event_id": entry.event_id}
        if claims.command == "snapshot":
            from agent.vision.snapshot import request_snapshot  # stdlib only: no numpy in the agent process

            return {"evidence": request_snapshot(agent.config.evidence_dir, claims.command_id, SNAPSHOT_WAIT_S)}
        return {"restarting": True}

    def _refuse(self, claims: CommandClaims | None, reason: str, detail: str) -> None:
        self.counters[f"refused_{reason}"] += 1
        log.warning("command refused: %s: %s", reason, detail)
        if time.monotonic() - self._last_refusal_report < REFUSAL_REPORT_S:
            return
        self._last_refusal_report = time.monotonic()
        body: dict[str, Any] = {"outcome": "refused", "reason": f"{reason}: {detail}"[:500]}
        if claims is not None:
            body |= {"command": claims.command, "command_id": str(claims.command_id)}
        self._agent.raise_event("event", {"command": body})

    def _answer(self, claims: CommandClaims, outcome: str, **details: Any) -> None:
        self.counters[outcome] += 1
        body = {"outcome": outcome, "command": claims.command, "command_id": str(claims.command_id), **details}
        self._agent.raise_event("event", {"command": body})

    # Single use, across restarts.

    def _load_used(self) -> dict[str, float]:
        try:
            data = json.loads(self._used_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("cannot read %s (%s): commands already run may be refused as too old only", self._used_path, exc)
            return {}
        return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _remember(self, claims: CommandClaims) -> None:
        """Written before the command runs: a crash mid-command never lets the same id run twice."""
        now = self._agent.clock.now()
        self._used = {k: v for k, v in self._used.items() if v >= now - FUTURE_SLACK_S}  # expired: refused anyway
        self._used[str(claims.command_id)] = claims.expires
        write_file_atomically(self._used_path, json.dumps(self._used).encode(), 0o640)


def self_checks(agent: Agent) -> list[dict[str, Any]]:
    """The running agent's own checks, one row each: what ``problems()`` looks at, spelled out."""
    rows = [
        {"check": loop.name, "ok": loop.problem() is None, "detail": loop.problem() or "beating"}
        for loop in agent._loops()
    ]
    rows.append(
        {
            "check": "mqtt",
            "ok": agent.link.is_connected,
            "detail": "connected" if agent.link.is_connected else "not connected",
        }
    )
    responsive = agent.outbox.is_responsive(timeout_s=1.0)
    rows.append(
        {
            "check": "outbox",
            "ok": responsive,
            "detail": f"depth {agent.outbox.depth()}" if responsive else "not responding",
        }
    )
    for name, button in agent.buttons.items():
        try:
            rows.append(
                {"check": f"button {name}", "ok": True, "detail": "pressed" if button.is_pressed else "released"}
            )
        except Exception as exc:  # noqa: BLE001 - the line may be gone: that is the finding
            rows.append({"check": f"button {name}", "ok": False, "detail": str(exc)})
    if agent.vision is not None:
        rows.append({"check": "vision", "ok": agent.vision.state == "running", "detail": agent.vision.state})
    rows.append(
        {
            "check": "configuration",
            "ok": not agent.safe_mode,
            "detail": agent.health()["safe_mode"] or f"version {agent.config_version}",
        }
    )
    return rows
