"""Evidence images, redacted before they touch the disk, kept for a bounded time.

Off by default and enabled per rule. The ``Redactor`` fills privacy masks, covers the head of every
person box and every face its face model finds *before* the JPEG is encoded; when it cannot run,
nothing is written (``RedactionUnavailable``) and the alert says evidence was withheld. The alert
carries only a reference and the sha256. Files older than the retention are deleted.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import cv2
import numpy as np

from agent.runtime.files import write_file_atomically
from agent.vision.redaction import Redactor, person_boxes


class EvidenceStore:
    def __init__(self, directory: Path, retention_s: float, redactor: Redactor, jpeg_quality: int = 80):
        self.directory = Path(directory)
        self.retention_s = retention_s
        self.redactor = redactor
        self.jpeg_quality = jpeg_quality
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def save(self, rgb: np.ndarray, people: list, event_id: str) -> dict:
        """Redact, encode and store; returns the reference that goes into the signed alert.

        ``people`` are tracks and detections of any class and state: every person among them has its head
        covered. Raises ``RedactionUnavailable`` (nothing written) when the picture cannot be redacted.
        """
        image = self.redactor.redact(rgb, person_boxes(people))
        ok, jpeg = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality]
        )
        if not ok:
            raise OSError("JPEG encoding of evidence failed")
        data = jpeg.tobytes()
        name = f"{event_id}.jpg"
        write_file_atomically(self.directory / name, data, 0o600)
        return {
            "ref": f"evidence/{name}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "expires_in_s": self.retention_s,
        }

    def purge(self, now: float | None = None) -> int:
        """Delete evidence older than the retention; returns how many files went."""
        cutoff = (time.time() if now is None else now) - self.retention_s
        removed = 0
        for path in self.directory.glob("*.jpg"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
