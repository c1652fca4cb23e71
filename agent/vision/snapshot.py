"""A redacted snapshot on the centre's request: stored and fetched exactly like evidence.

The agent (``snapshot`` command, ``agent.device.commands``) cannot see frames:
the vision process has the camera. It writes a request file holding one id
into the evidence directory (0700, the agent's own); the vision process looks
for it at most every ``CHECK_EVERY_S``, and on its next frame stores that frame
through the same ``EvidenceStore.save`` as evidence (masks, heads and faces
redacted before encoding; nothing written when redaction cannot run) as
``<id>.jpg``, or writes ``<id>.error`` saying why not. The agent answers the
command with the reference and sha256, and the centre fetches the image with
a signed evidence request: sealed for the centre, as any evidence.

Only stdlib here: the agent side imports this without numpy.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from agent.runtime.files import write_file_atomically

log = logging.getLogger(__name__)

REQUEST = "snapshot-request"
CHECK_EVERY_S = 0.5


def request_snapshot(evidence_dir: Path, snapshot_id: uuid.UUID, timeout_s: float) -> dict[str, Any]:
    """The agent's side: ask, then wait for the stored picture; RuntimeError with the reason if none comes."""
    directory = Path(evidence_dir)
    write_file_atomically(directory / REQUEST, str(snapshot_id).encode(), 0o600)
    image, error = directory / f"{snapshot_id}.jpg", directory / f"{snapshot_id}.error"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if image.exists():
            data = image.read_bytes()
            return {"ref": f"evidence/{image.name}", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if error.exists():
            reason = error.read_text(encoding="utf-8", errors="replace")[:300]
            error.unlink(missing_ok=True)
            raise RuntimeError(f"no snapshot: {reason}")
        time.sleep(0.05)
    (directory / REQUEST).unlink(missing_ok=True)
    raise RuntimeError(f"no snapshot within {timeout_s:g} s: is the camera delivering frames?")


class SnapshotRequests:
    """The vision process's side: a pending request's id, looked for at most every CHECK_EVERY_S."""

    def __init__(self, evidence_dir: Path):
        self.directory = Path(evidence_dir)
        self._next_check = 0.0

    def pending(self) -> uuid.UUID | None:
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + CHECK_EVERY_S
        path = self.directory / REQUEST
        try:
            text = path.read_text(encoding="utf-8")[:64]
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        path.unlink(missing_ok=True)
        try:
            return uuid.UUID(text.strip())
        except ValueError:
            log.warning("snapshot request ignored: %r is not an id", text)
            return None

    def refuse(self, snapshot_id: uuid.UUID, reason: str) -> None:
        write_file_atomically(self.directory / f"{snapshot_id}.error", reason.encode(), 0o600)
