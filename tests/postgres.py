"""A throwaway PostgreSQL for the centre's tests: Debian's server, a temp directory, a unix socket, no TCP.

``initdb`` refuses to run as root, and CI runs as root: then the server runs as ``nobody`` (setpriv) on
a directory that user owns. Stopped and removed at the end of the test session.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

UNPRIVILEGED = "nobody"
DATABASE_USER = "edge"


def server_binaries() -> Path | None:
    """Debian's PostgreSQL binaries (the newest installed), else whatever is on PATH; None if there are none."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


class ThrowawayPostgres:
    """``with ThrowawayPostgres() as pg: pg.dsn`` — a fresh cluster that exists only for the block."""

    def __init__(self, binaries: Path, listen: tuple[str, int] | None = None, trusted_subnet: str | None = None):
        """``listen`` (address, port): also TCP on that one address, trusting clients from ``trusted_subnet`` only
        (the network-namespace tests); otherwise the unix socket alone."""
        self.binaries = binaries
        self.listen = listen
        self.trusted_subnet = trusted_subnet
        self.root = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log = self.root / "server.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(UNPRIVILEGED)
            self._as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
            os.chmod(self.root, 0o755)
        self.socket_dir.mkdir()
        if self._as_user:
            for path in (self.root, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)

    @property
    def dsn(self) -> str:
        if self.listen is not None:
            return f"postgresql://{DATABASE_USER}@{self.listen[0]}:{self.listen[1]}/postgres"
        return f"postgresql://{DATABASE_USER}@/postgres?host={self.socket_dir}"

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, *command: str, timeout: float = 60) -> None:
        result = subprocess.run([*self._as_user, *command], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:2])} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> None:
        self._run(
            str(self.binaries / "initdb"),
            "--pgdata",
            str(self.data),
            "--username",
            DATABASE_USER,
            "--auth",
            "trust",
            "--no-sync",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
        )
        options = f"-k {self.socket_dir} -c listen_addresses='' -c fsync=on"
        if self.listen is not None:
            address, port = self.listen
            options = f"-k {self.socket_dir} -c listen_addresses='{address}' -p {port} -c fsync=on"
            hba = self.data / "pg_hba.conf"  # only this subnet over TCP; the socket stays as initdb made it
            lines = [line for line in hba.read_text().splitlines() if not line.startswith("host")]
            hba.write_text("\n".join([*lines, f"host all all {self.trusted_subnet} trust", ""]))
        self._run(
            str(self.binaries / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        try:
            self._run(str(self.binaries / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)
