"""Configuration pushed by the centre: verified, validated, applied, health-gated, kept or rolled back.

A push arrives (retained) on the device's ``config`` topic as a signed
document (``agent.protocol.config_doc``). The updater, on its own thread:

1. refuses it unless the centre's key signed it, it names this device and
   site (and a ``group:`` selector this device's kind), its version is newer
   than any this device handled, and it has not expired;
2. lays it over the settings in force and validates the whole configuration;
   every validation error goes back to the centre;
3. waits while an alert is unacknowledged (a change never lands mid-alarm);
4. applies it live: telemetry interval, acknowledgement display and the
   vision pipeline (camera, detector, zones, masks, rules…; the vision process
   is restarted with them). A change to anything else (broker, buttons, pins,
   outbox) needs the agent restarted: the push is written down as on *trial*
   and the agent restarts itself (``edge-agent run`` starts it again in the
   same process); the new agent runs the gate below, and on failure restarts
   once more, on the configuration it had before. An agent that cannot restart
   itself (embedded in a test or the demo) refuses such a push, with that reason;
5. runs the health gate: the agent's self-check (its threads, MQTT network
   thread, outbox, every button line readable; on a camera box, the vision
   process beating) and a test alert that the centre must acknowledge within
   the document's ``gate_s``. Passed: the settings are kept and become the
   last-known-good; failed: the previous configuration is put back.

Each outcome (applied, rejected, rolled_back, refused) is reported in a signed
``event`` whose body is ``{"config_update": {...}}``; the receiver stores and
acknowledges it like any event.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any

from joserfc.jwk import OKPKey

from agent.config.device import AgentConfig
from agent.device.config_files import ConfigFiles, PushedSettings, Trial
from agent.device.push_inbox import PushInbox
from agent.device.safe_mode import StartingConfig, validate
from agent.errors import ConfigError, SignatureInvalid
from agent.protocol.config_doc import ConfigClaims, merge, open_document
from agent.runtime.guard import LoopGuard

if TYPE_CHECKING:
    from agent.device.agent import Agent

log = logging.getLogger(__name__)

#: Settings that apply while the agent runs (top-level sections; the vision ones restart the vision process).
LIVE_SECTIONS = frozenset(
    {"telemetry", "camera", "detector", "motion", "filters", "zones", "privacy_masks", "rules", "evidence", "vision"}
)
#: Of [indicator], only this is live: the pins are opened at start.
LIVE_INDICATOR = frozenset({"ack_display_s"})
#: How often the updater looks again while it waits (alerts unacknowledged, the gate).
POLL_S = 0.1
#: Documents remembered by hash, so the retained copy seen again on reconnect is not handled twice.
SEEN_MAX = 64
#: Lines of validation errors sent to the centre at most.
ERRORS_MAX = 50
#: A start that is not healthy this long is not kept as last-known-good (and pushes are taken meanwhile).
CONFIRM_START_S = 120.0
#: Refusals (forged, stale, misaddressed) are reported at most this often; the rest are counted and logged.
REFUSAL_REPORT_S = 10.0


class ConfigUpdater:
    """Takes pushed configurations for one agent (see the module docstring)."""

    def __init__(self, agent: Agent, centre_key: OKPKey, starting: StartingConfig | None):
        self._agent = agent
        self._centre_key = centre_key
        self.files = ConfigFiles(agent.config.state_dir)
        self.pushed = self.files.pushed()
        if starting is not None and starting.local is not None:
            self._local, self._path = starting.local, starting.path
            self._text = starting.path.read_text(encoding="utf-8") if starting.path.exists() else ""
        else:  # built from a config object (tests, demo): its own settings are the base, paths already absolute
            self._local = agent.config.model_dump(mode="json")
            self._path, self._text = agent.config.state_dir / "agent.toml", ""
        self._confirm_start = starting is None or starting.source == "file"
        self._trial = starting.trial if starting is not None else None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._acked: dict[int, threading.Event] = {}
        self.counters: Counter[str] = Counter()
        self._last_refusal_report = -REFUSAL_REPORT_S
        self.state = "idle"
        self.guard = LoopGuard("config-updater", stall_s=3600 * 24)  # waits (alerts, gates) are not stalls
        self._inbox = PushInbox(self.guard, maxsize=16)
        self._stopping = self._inbox.stopping

    # Called from other threads.

    def submit(self, payload: bytes) -> None:
        """From paho\'s thread: queue only; a full queue drops the oldest (a newer push supersedes it anyway)."""
        self._inbox.submit(payload)

    def acknowledged(self, seq: int) -> None:
        event = self._acked.get(seq)
        if event is not None:
            event.set()

    def start(self) -> None:
        self.guard.start(self._run)

    def close(self) -> None:
        self._inbox.close()

    def report(self) -> dict[str, Any]:
        return {"state": self.state, "version": self.pushed.version, "counters": dict(self.counters)}

    # The updater's thread.

    def _run(self) -> None:
        with self.guard.step("report an earlier outcome"):
            self._send_pending_report()
        if self._trial is not None:
            with self.guard.step("health gate after a restart"):
                self._judge_trial(self._trial)
        elif self._confirm_start:
            with self.guard.step("confirm start"):
                self._keep_start_config()
        self._inbox.serve(self._handle, "config push", after=self._idle)

    def _idle(self) -> None:
        self.state = "idle"

    def _send_pending_report(self) -> None:
        """An outcome decided at start (a trial dropped), before the agent could send it."""
        report = self.pushed.report
        if report is None:
            return
        self.counters[str(report.get("outcome"))] += 1
        self._agent.raise_event("event", {"config_update": report})  # stored durably before it is forgotten here
        self.pushed = PushedSettings(self.pushed.version, self.pushed.handled, self.pushed.overlay)
        self.files.save_pushed(self.pushed)

    def _judge_trial(self, trial: Trial) -> None:
        """This start runs a push that needed a restart: keep it if the gate passes, else restart on the one before."""
        agent, version = self._agent, trial.version
        self.state = f"health gate v{version} (after a restart)"
        deadline = time.monotonic() + trial.gate_s
        while not agent.link.is_connected and time.monotonic() < deadline:
            if self._stopping.wait(POLL_S):
                return
        failed = self.health_gate(version, max(1.0, deadline - time.monotonic()))
        if self._stopping.is_set():
            return  # stopped from outside mid-gate: the next start finds the trial tried, and drops it
        self.files.clear_trial()
        base = {"version": version, "selector": trial.selector}
        if failed is None:
            self.pushed = PushedSettings(version, version, trial.overlay)
            self.files.save_pushed(self.pushed)
            self.files.save_last_good(agent.config, version)
            self._report_outcome("applied", {**base, "changed": ["restart"]})
            return
        log.error("pushed configuration v%d failed its health gate (%s); restarting on the one before", version, failed)
        previous = self.files.pushed()
        self.pushed = PushedSettings(previous.version, max(previous.handled, version), previous.overlay)
        self.files.save_pushed(self.pushed)
        agent.config_version = previous.version
        self._report_outcome("rolled_back", {**base, "reason": failed})
        agent.request_restart(f"pushed configuration v{version} rolled back")

    def _report_outcome(self, outcome: str, body: dict[str, Any]) -> None:
        self.counters[outcome] += 1
        self._agent.raise_event("event", {"config_update": {"outcome": outcome, **body}})

    def _keep_start_config(self) -> None:
        """A configuration from the file that runs healthy (connected, self-check clean) becomes last-known-good."""
        agent = self._agent
        deadline = time.monotonic() + CONFIRM_START_S
        while not self._stopping.wait(POLL_S):
            if time.monotonic() > deadline:
                log.warning(
                    "not healthy within %.0f s of start: the last-known-good configuration is kept as it was",
                    CONFIRM_START_S,
                )
                return
            if agent.link.is_connected and not agent.problems():
                self.files.save_last_good(agent.config, self.pushed.version)
                log.info("configuration (pushed version %d) runs healthy: kept as last-known-good", self.pushed.version)
                return

    def _handle(self, token: bytes) -> None:
        digest = hashlib.sha256(token).hexdigest()
        if digest in self._seen:
            return  # the same retained document again (a reconnect): handled already
        self._seen[digest] = None
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
        try:
            claims = open_document(token, self._centre_key)
        except SignatureInvalid as exc:
            self._refuse(None, exc.reason, str(exc))
            return
        if claims.version == self.pushed.handled:
            log.debug("pushed configuration v%d seen again: handled already", claims.version)
            return
        problem = self._addressing_problem(claims)
        if problem is not None:
            self._refuse(claims, *problem)
            return
        self._take(claims)

    def _addressing_problem(self, claims: ConfigClaims) -> tuple[str, str] | None:
        agent = self._agent
        if (claims.device, claims.site) != (agent.device, agent.site):
            return "device_mismatch", f"addressed to {claims.site}/{claims.device}, not {agent.site}/{agent.device}"
        scope, _, name = claims.selector.partition(":")
        wanted = {"device": agent.device, "site": agent.site, "group": agent.config.device.kind}[scope]
        if name != wanted:
            return "device_mismatch", f"selector {claims.selector} does not select this {agent.config.device.kind}"
        if claims.version < self.pushed.handled:
            return "stale", f"version {claims.version} is older than version {self.pushed.handled} handled already"
        now = agent.clock.now()
        if claims.expires < now:
            return "expired", f"expired {now - claims.expires:.0f} s ago"
        return None

    def _take(self, claims: ConfigClaims) -> None:
        version = claims.version
        log.info("pushed configuration v%d (%s) received", version, claims.selector)
        overlay = merge(self.pushed.overlay, claims.config)
        try:
            candidate = validate(merge(self._local, overlay), self._path, self._text, version)
        except ConfigError as exc:
            self._finish(claims, "rejected", errors=exc.problems[:ERRORS_MAX])
            return
        blocked = restart_needed(self._agent.config, candidate)
        if blocked and not self._agent.restartable:
            reason = (
                f"changes {', '.join(blocked)}, which need the agent restarted, and this agent cannot restart itself"
            )
            self._finish(claims, "rejected", errors=[reason])
            return
        if not self._wait_until_quiet(claims):
            return
        if blocked:
            self.files.save_trial(Trial(version, claims.selector, claims.gate_s, overlay))
            self._agent.request_restart(f"pushed configuration v{version} changes {', '.join(blocked)}")
            return
        previous = self._agent.config
        self.state = f"health gate v{version}"
        self._agent.reconfigure(candidate)
        failed = self.health_gate(version, claims.gate_s)
        if self._stopping.is_set():
            return  # stopped mid-gate: nothing decided; the retained copy is taken again at the next start
        if failed is None:
            self.pushed = PushedSettings(version, version, overlay)
            self.files.save_pushed(self.pushed)
            self.files.save_last_good(candidate, version)
            self._agent.config_applied(version)
            self._finish(claims, "applied", changed=changed_sections(previous, candidate), save=False)
        else:
            log.error("pushed configuration v%d failed its health gate (%s); rolling back", version, failed)
            self._agent.reconfigure(previous)
            self._finish(claims, "rolled_back", reason=failed)

    def _wait_until_quiet(self, claims: ConfigClaims) -> bool:
        """Wait while an alert is unacknowledged; False (reported) if the document expires first."""
        self.state = f"v{claims.version} waits: an alert is unacknowledged"
        while self._agent.alerts_unacknowledged():
            if self._stopping.wait(1.0):
                return False
            self.guard.beat()
            if claims.expires < self._agent.clock.now():
                self._finish(claims, "refused", reason="expired while an alert was unacknowledged")
                return False
        return True

    def health_gate(self, version: int | str, gate_s: float) -> str | None:
        """None when the agent passes its self-check and a test alert is acknowledged within ``gate_s``."""
        agent = self._agent
        deadline = time.monotonic() + gate_s
        if agent.vision is not None:
            while not agent.vision.stats:  # the new vision process's first heartbeat
                if time.monotonic() > deadline or self._stopping.wait(POLL_S):
                    return f"self-test: the vision process did not start within {gate_s:g} s ({agent.vision.state})"
        problems = agent.problems()
        if problems:
            return "self-test: " + "; ".join(problems)
        acked = threading.Event()
        entry = agent.gate_alert(version)
        if entry is None:
            return "test alert: could not be stored in the outbox"
        self._acked[entry.seq] = acked
        try:
            while not acked.wait(POLL_S):
                if time.monotonic() > deadline or self._stopping.is_set():
                    return f"test alert seq {entry.seq} not acknowledged by the centre within {gate_s:.0f} s"
        finally:
            self._acked.pop(entry.seq, None)
        problems = agent.problems()
        return "self-test: " + "; ".join(problems) if problems else None

    def _refuse(self, claims: ConfigClaims | None, reason: str, detail: str) -> None:
        log.warning("pushed configuration refused: %s: %s", reason, detail)
        if time.monotonic() - self._last_refusal_report < REFUSAL_REPORT_S:
            self.counters["refused_unreported"] += 1  # a flood of junk on the topic never floods the centre
            return
        self._last_refusal_report = time.monotonic()
        self._report(claims, "refused", reason=f"{reason}: {detail}"[:500])

    def _finish(self, claims: ConfigClaims, outcome: str, save: bool = True, **details: Any) -> None:
        """Remember the version as handled (never taken again) and tell the centre."""
        if save:
            self.pushed = PushedSettings(
                self.pushed.version, max(self.pushed.handled, claims.version), self.pushed.overlay
            )
            self.files.save_pushed(self.pushed)
        log.log(
            logging.INFO if outcome == "applied" else logging.WARNING,
            "pushed configuration v%d: %s %s",
            claims.version,
            outcome,
            details,
        )
        self._report(claims, outcome, **details)

    def _report(self, claims: ConfigClaims | None, outcome: str, **details: Any) -> None:
        self.counters[outcome] += 1
        body: dict[str, Any] = {"outcome": outcome, **details}
        if claims is not None:
            body |= {"version": claims.version, "selector": claims.selector}
        self._agent.raise_event("event", {"config_update": body})


def restart_needed(current: AgentConfig, candidate: AgentConfig) -> list[str]:
    """The settings that differ and cannot change while the agent runs (dotted section names)."""
    old, new = current.model_dump(mode="json"), candidate.model_dump(mode="json")
    blocked = [
        name
        for name in sorted(set(old) | set(new))
        if name not in LIVE_SECTIONS and name != "indicator" and old.get(name) != new.get(name)
    ]
    for key in sorted(set(old["indicator"]) | set(new["indicator"])):
        if key not in LIVE_INDICATOR and old["indicator"].get(key) != new["indicator"].get(key):
            blocked.append(f"indicator.{key}")
    return blocked


def changed_sections(current: AgentConfig, candidate: AgentConfig) -> list[str]:
    old, new = current.model_dump(mode="json"), candidate.model_dump(mode="json")
    return [name for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
