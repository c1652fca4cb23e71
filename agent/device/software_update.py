"""Staged software updates of the agent itself: verified, installed beside, switched, health-gated, kept or undone.

On disk, in the state directory::

    versions/<V>/venv          one virtual environment per installed version
    current -> versions/<V>/venv   the version that runs (absent: the base installation runs)
    software/trial.json        a switch not yet judged: version, the one before, starts so far
    software/state.json        versions handled (installed / rolled_back), and a report not sent yet

**Installing.** A manifest (``agent.protocol.update_manifest``) arrives,
retained, on the device's ``update`` topic. The updater refuses it unless the
centre signed it for this device and site, its stage selects this device, it
has not expired, its version is newer than the one running (and was not
rolled back here before), and this agent reads the configuration schema it
needs. Then it downloads the artefact (at most the manifest's size, sha256
checked), makes ``versions/<V>/venv`` with ``python -m venv --without-pip``
and puts one ``.pth`` line in it naming the base installation's
site-packages: the dependencies (paho, joserfc, pydantic, LiteRT…) are shared,
nothing is fetched, so it works offline and takes seconds; the new version's
own ``agent`` package, installed into the new venv by the base's pip
(``--no-deps --no-index``), comes first on the path. The new venv must import
the agent and report the manifest's version before anything is switched.

**Switching.** ``current`` is replaced atomically (a temporary symlink, then
``os.replace``), the trial is written, and the agent stops and is started
again through the *launcher* (:func:`launch`, the first thing ``edge-agent
run`` does in the base installation, which updates never touch): it counts
the trial's starts and ``exec``\\ s the interpreter of ``current``. The new
version runs the same health gate as a pushed configuration (self-check, a
test alert acknowledged by the centre within the manifest's ``gate_s``):
passed, it is kept; failed, ``current`` goes back to the version before and
the agent starts again on it. A version that never gets as far as its gate
(it crashes at start) is switched back by the launcher after
``MAX_TRIAL_STARTS`` starts.

**The outbox.** Both versions open the same SQLite outbox; the updater never
migrates it, and a version whose outbox schema differs must migrate only
after its gate passed (so the one before can still read it if it fails).

Each outcome is reported in a signed ``event`` whose body is
``{"software_update": {...}}``: installed, rolled_back (with the reason),
refused (with the reason). An update is refused before anything is fetched when the disk could not
hold it and still keep ``KEEP_FREE_BYTES`` free for the outbox and the logs; a failed download or
install leaves nothing of the new version behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter, OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from joserfc.jwk import OKPKey

from agent import __version__
from agent.device.push_inbox import PushInbox
from agent.errors import SignatureInvalid
from agent.protocol.update_manifest import CONFIG_SCHEMA, UpdateClaims, open_manifest, version_key
from agent.runtime.files import write_file_atomically
from agent.runtime.guard import LoopGuard

if TYPE_CHECKING:
    from agent.device.agent import Agent

log = logging.getLogger(__name__)

#: Starts a new version gets to pass its gate before the launcher switches back.
MAX_TRIAL_STARTS = 2
#: The launcher sets these for the interpreter it starts (and a relaunch reads them back).
LAUNCHED_ENV = "EDGE_AGENT_LAUNCHED"
BASE_PYTHON_ENV = "EDGE_AGENT_BASE_PYTHON"
BASE_PYTHONPATH_ENV = "EDGE_AGENT_BASE_PYTHONPATH"
INSTALL_TIMEOUT_S = 300.0
DOWNLOAD_TIMEOUT_S = 60.0
SEEN_MAX = 32
#: Free space an update needs: its artefact this many times (the file, the unpacked version, pip's copy)…
INSTALL_SPACE_FACTOR = 4
#: …and this much left over afterwards, for the outbox, the logs and the system.
KEEP_FREE_BYTES = 64 * 1024 * 1024
POLL_S = 0.1
REFUSAL_REPORT_S = 10.0


class UpdateRefused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class SoftwareFiles:
    """The versions, the ``current`` symlink and the updater's records in one state directory."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir)
        self.versions = self.root / "versions"
        self.current = self.root / "current"
        self.trial_path = self.root / "software" / "trial.json"
        self.state_path = self.root / "software" / "state.json"

    def venv(self, version: str) -> Path:
        return self.versions / version / "venv"

    def running_prefix(self) -> Path:
        """The environment ``current`` names; the base installation (this interpreter's) when there is none."""
        try:
            return self.current.resolve(strict=True)
        except OSError:
            return Path(sys.prefix).resolve()

    def switch(self, target: Path) -> None:
        """Point ``current`` at ``target`` atomically: a temporary symlink replaces the old one in one rename."""
        temporary = self.current.with_name(f".current.{os.getpid()}")
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target)
        os.replace(temporary, self.current)
        _sync_dir(self.root)

    def prune(self, keep: set[Path]) -> None:
        """Delete installed versions other than ``keep`` (the one running and the one to go back to)."""
        kept = {path.resolve() for path in keep}
        for venv in self.versions.glob("*/venv"):
            if venv.resolve() not in kept:
                shutil.rmtree(venv.parent, ignore_errors=True)

    def trial(self) -> dict[str, Any] | None:
        return _read_json(self.trial_path)

    def save_trial(self, trial: dict[str, Any] | None) -> None:
        if trial is None:
            self.trial_path.unlink(missing_ok=True)
        else:
            _write_json(self.trial_path, trial)

    def state(self) -> dict[str, Any]:
        state = _read_json(self.state_path) or {}
        state.setdefault("handled", {})
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        _write_json(self.state_path, state)

    def mark(self, version: str, outcome: str, report: dict[str, Any] | None = None) -> None:
        """Remember what became of a version; ``report`` is sent by the next agent that runs."""
        state = self.state()
        state["handled"][version] = outcome
        if report is not None:
            state["report"] = report
        self.save_state(state)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    write_file_atomically(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), 0o640)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The launcher: in the base installation, before any agent starts.


def launch(state_dir: Path, argv: list[str]) -> None:
    """Judge a trial that keeps failing to start, then ``exec`` the version ``current`` names (returns if it is us)."""
    if os.environ.get(LAUNCHED_ENV):
        return  # started by the launcher already: this is the version to run
    files = SoftwareFiles(state_dir)
    count_trial_start(files)
    target = files.running_prefix()
    if target == Path(sys.prefix).resolve():
        return
    python = target / "bin" / "python"
    if not python.exists():  # removed by hand, or an image update: never a start loop on a missing version
        log.error("%s has no interpreter: running the base installation instead", target)
        files.current.unlink(missing_ok=True)
        return
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the version's own venv, nothing else first
    env |= {LAUNCHED_ENV: "1", BASE_PYTHON_ENV: sys.executable, BASE_PYTHONPATH_ENV: os.environ.get("PYTHONPATH", "")}
    log.info("starting agent version in %s", target)
    os.execve(python, [str(python), "-P", "-m", "agent.cli", *argv], env)  # -P: not the cwd's agent


def count_trial_start(files: SoftwareFiles) -> None:
    """One more start of a version on trial; past MAX_TRIAL_STARTS, switch back to the one before."""
    trial = files.trial()
    if trial is None:
        return
    starts = int(trial.get("starts", 0))
    if starts < MAX_TRIAL_STARTS:
        files.save_trial({**trial, "starts": starts + 1})
        return
    reason = f"version {trial['version']} did not pass its health gate in {starts} start(s)"
    log.error("%s: switching back to %s", reason, trial["previous"])
    files.switch(Path(trial["previous"]))
    report = {"outcome": "rolled_back", "version": trial["version"], "from": trial["from"], "reason": reason}
    files.mark(trial["version"], "rolled_back", report)
    files.save_trial(None)


def relaunch() -> None:
    """``exec`` the launcher of the base installation again (after a switch): it starts whatever ``current`` is."""
    python = os.environ.get(BASE_PYTHON_ENV) or sys.executable
    env = {k: v for k, v in os.environ.items() if k not in (LAUNCHED_ENV, BASE_PYTHON_ENV, BASE_PYTHONPATH_ENV)}
    if os.environ.get(BASE_PYTHONPATH_ENV):
        env["PYTHONPATH"] = os.environ[BASE_PYTHONPATH_ENV]
    os.execve(python, [python, "-P", "-m", "agent.cli", *sys.argv[1:]], env)


# Installing beside the running version.


def check_disk_space(files: SoftwareFiles, claims: UpdateClaims) -> None:
    """Refuse an update the disk cannot hold with room to spare: alerts must never be short of space for one."""
    files.versions.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(files.versions).free
    needed = claims.size * INSTALL_SPACE_FACTOR + KEEP_FREE_BYTES
    if free < needed:
        mib = 1024 * 1024
        raise UpdateRefused(
            "disk_space",
            f"{free // mib} MiB free in {files.versions}; version {claims.version} needs {needed // mib} MiB "
            f"(its artefact {INSTALL_SPACE_FACTOR} times, and {KEEP_FREE_BYTES // mib} MiB left for alerts and logs)",
        )


def download(claims: UpdateClaims, destination: Path) -> None:
    """Fetch the artefact: never more than the manifest's size, and its sha256 must match (else nothing is kept)."""
    try:
        _download(claims, destination)
    except UpdateRefused:
        destination.unlink(missing_ok=True)
        raise


def _download(claims: UpdateClaims, destination: Path) -> None:
    digest, received = hashlib.sha256(), 0
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(claims.url, timeout=DOWNLOAD_TIMEOUT_S) as source, destination.open("wb") as out:
            while chunk := source.read(64 * 1024):
                received += len(chunk)
                if received > claims.size:
                    raise UpdateRefused("artefact_size", f"more than the manifest's {claims.size} bytes")
                digest.update(chunk)
                out.write(chunk)
    except (OSError, ValueError) as exc:
        raise UpdateRefused("download", f"{claims.url}: {exc}") from None
    if received != claims.size:
        raise UpdateRefused("artefact_size", f"{received} bytes, the manifest says {claims.size}")
    if digest.hexdigest() != claims.sha256:
        raise UpdateRefused("artefact_sha256", f"sha256 {digest.hexdigest()} is not the manifest's {claims.sha256}")


def shared_site_packages(files: SoftwareFiles) -> list[str]:
    """The base installation's site-packages (the dependencies), never another version's."""
    versions = str(files.versions.resolve())
    found = [p for p in sys.path if p.endswith("site-packages") and not str(Path(p).resolve()).startswith(versions)]
    return list(dict.fromkeys(found))


def install(files: SoftwareFiles, claims: UpdateClaims, artefact: Path) -> Path:
    """A new venv for the version: the base's dependencies through a .pth, the artefact installed by pip."""
    venv = files.venv(claims.version)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", LAUNCHED_ENV)}
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], env, "make the venv")
    site = _run(
        [str(python), "-P", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env, "find its site"
    )
    Path(site.strip(), "edge-agent-base.pth").write_text("\n".join(shared_site_packages(files)) + "\n")
    pip = [
        str(python),
        "-P",
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "--ignore-installed",
        "--no-warn-conflicts",
    ]
    _run([*pip, "--disable-pip-version-check", "--no-build-isolation", str(artefact)], env, "install the artefact")
    check = "import agent, agent.cli, agent.device.agent; print(agent.__version__)"
    found = _run([str(python), "-P", "-c", check], env, "import the new version").strip()
    if found != claims.version:
        raise UpdateRefused("install", f"the artefact installs version {found!r}, not {claims.version}")
    return venv


def _run(command: list[str], env: dict[str, str], what: str) -> str:
    try:
        done = subprocess.run(command, env=env, cwd="/", capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UpdateRefused("install", f"{what}: {exc}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise UpdateRefused("install", f"{what}: exit {done.returncode}: {' | '.join(tail)}"[:500])
    return done.stdout


class SoftwareUpdater:
    """Takes update manifests for one agent, and judges a version on trial (see the module docstring)."""

    def __init__(self, agent: Agent, centre_key: OKPKey):
        self._agent = agent
        self._centre_key = centre_key
        self.files = SoftwareFiles(agent.config.state_dir)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._last_refusal_report = -REFUSAL_REPORT_S
        self.counters: Counter[str] = Counter()
        self.state = "idle"
        self.guard = LoopGuard("software-updater", stall_s=3600 * 24)  # downloads, installs and gates are not stalls
        self._inbox = PushInbox(self.guard, maxsize=8)
        self._stopping = self._inbox.stopping

    def submit(self, payload: bytes) -> None:
        """From paho\'s thread: queue only; a full queue drops the oldest (a newer manifest supersedes it)."""
        self._inbox.submit(payload)

    def start(self) -> None:
        self.guard.start(self._run)

    def close(self) -> None:
        self._inbox.close()

    def report(self) -> dict[str, Any]:
        return {"state": self.state, "running": __version__, "counters": dict(self.counters)}

    def _run(self) -> None:
        with self.guard.step("report an earlier outcome"):
            self._send_pending_report()
        trial = self.files.trial()
        if trial is not None:
            with self.guard.step("health gate of a new version"):
                self._judge(trial)
        self._inbox.serve(self._handle, "update manifest", after=self._idle)

    def _idle(self) -> None:
        self.state = "idle"

    def _send_pending_report(self) -> None:
        state = self.files.state()
        report = state.pop("report", None)
        if report is None:
            return
        self._report(report)  # in the outbox (durable) before it is forgotten here
        self.files.save_state(state)

    def _judge(self, trial: dict[str, Any]) -> None:
        """This start runs a version on trial: keep it if the gate passes, else switch back and start again."""
        agent, version = self._agent, str(trial.get("version"))
        base = {"version": version, "from": trial.get("from")}
        if version != __version__:
            reason = f"version {__version__} started instead of {version}"
            self._switch_back(trial, {**base, "outcome": "rolled_back", "reason": reason})
            return
        self.state = f"health gate of version {version}"
        gate_s = float(trial.get("gate_s", 60.0))
        deadline = time.monotonic() + gate_s
        while not agent.link.is_connected and time.monotonic() < deadline:
            if self._stopping.wait(POLL_S):
                return
        failed = agent.config_updater.health_gate(version, max(1.0, deadline - time.monotonic()))
        if self._stopping.is_set():
            return  # stopped from outside mid-gate: the launcher counts this start
        if failed is None:
            self.files.save_trial(None)
            self.files.mark(version, "installed")
            self.files.prune(keep={self.files.venv(version), Path(trial["previous"])})
            self._report({**base, "outcome": "installed"})
            return
        log.error("version %s failed its health gate (%s); switching back to %s", version, failed, trial["from"])
        self._switch_back(trial, {**base, "outcome": "rolled_back", "reason": failed})

    def _switch_back(self, trial: dict[str, Any], report: dict[str, Any]) -> None:
        self.files.switch(Path(trial["previous"]))
        self.files.mark(str(trial.get("version")), "rolled_back")
        self.files.save_trial(None)
        self._report(report)  # stored in the outbox before the agent stops: the version before sends it
        self._agent.request_relaunch(f"version {trial.get('version')} rolled back")

    def _handle(self, token: bytes) -> None:
        digest = hashlib.sha256(token).hexdigest()
        if digest in self._seen:
            return
        self._seen[digest] = None
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
        try:
            claims = open_manifest(token, self._centre_key)
        except SignatureInvalid as exc:
            self._refuse(None, exc.reason, str(exc))
            return
        if claims.version == __version__ or claims.version in self.files.state()["handled"]:
            log.debug("update manifest for version %s: running or handled already", claims.version)
            return
        try:
            self._check(claims)
            self._wait_until_quiet(claims)
            if self._stopping.is_set():
                return
            self._install_and_switch(claims)
        except UpdateRefused as exc:  # not remembered: the retained manifest is judged again at the next start
            self._refuse(claims, exc.reason, exc.detail)

    def _check(self, claims: UpdateClaims) -> None:
        agent = self._agent
        if (claims.device, claims.site) != (agent.device, agent.site):
            raise UpdateRefused(
                "device_mismatch", f"for {claims.site}/{claims.device}, not {agent.site}/{agent.device}"
            )
        if not claims.selects(agent.device):
            raise UpdateRefused("not_in_stage", f"the manifest's stage does not select {agent.device}")
        now = agent.clock.now()
        if claims.expires < now:
            raise UpdateRefused("expired", f"expired {now - claims.expires:.0f} s ago")
        if version_key(claims.version) <= version_key(__version__):
            raise UpdateRefused("stale", f"version {claims.version} is not newer than {__version__}, which runs")
        if claims.min_config_schema > CONFIG_SCHEMA:
            raise UpdateRefused(
                "config_schema", f"needs configuration schema {claims.min_config_schema}; this one is {CONFIG_SCHEMA}"
            )
        if not agent.restartable:
            raise UpdateRefused("unsupported", "this agent cannot restart itself (not started by 'edge-agent run')")

    def _wait_until_quiet(self, claims: UpdateClaims) -> None:
        """Never while an alert is unacknowledged; refused if the manifest expires first."""
        self.state = f"version {claims.version} waits: an alert is unacknowledged"
        while self._agent.alerts_unacknowledged():
            if self._stopping.wait(1.0):
                return
            self.guard.beat()
            if claims.expires < self._agent.clock.now():
                raise UpdateRefused("expired", "expired while an alert was unacknowledged")

    def _install_and_switch(self, claims: UpdateClaims) -> None:
        self.state = f"installing version {claims.version}"
        log.info("update to version %s: downloading %s", claims.version, claims.url)
        check_disk_space(self.files, claims)
        try:
            download(claims, self.files.versions / claims.version / claims.filename)
            venv = install(self.files, claims, self.files.versions / claims.version / claims.filename)
        except UpdateRefused:  # nothing half-installed is kept (this version is newer than any that ran here)
            shutil.rmtree(self.files.versions / claims.version, ignore_errors=True)
            raise
        previous = self.files.running_prefix()
        trial = {
            "version": claims.version,
            "from": __version__,
            "previous": str(previous),
            "gate_s": claims.gate_s,
            "starts": 0,
        }
        self.files.save_trial(trial)
        self.files.switch(venv)
        log.warning("version %s installed in %s; restarting on it (trial)", claims.version, venv)
        self._agent.request_relaunch(f"software update to version {claims.version}")

    def _refuse(self, claims: UpdateClaims | None, reason: str, detail: str) -> None:
        log.warning("update manifest refused: %s: %s", reason, detail)
        if time.monotonic() - self._last_refusal_report < REFUSAL_REPORT_S:
            self.counters["refused_unreported"] += 1
            return
        self._last_refusal_report = time.monotonic()
        body: dict[str, Any] = {"outcome": "refused", "reason": f"{reason}: {detail}"[:500]}
        if claims is not None:
            body["version"] = claims.version
        self._report(body)

    def _report(self, body: dict[str, Any]) -> None:
        self.counters[str(body.get("outcome"))] += 1
        self._agent.raise_event("event", {"software_update": body})
