"""Evidence images, redacted before they touch the disk, kept for a bounded time.

Off by default and enabled per rule. Privacy-mask polygons are blacked out
and the upper part of every person box (head and face) is blurred beyond
recognition *before* the JPEG is encoded; the alert carries only a reference
and the sha256. Files older than the retention are deleted.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import cv2
import numpy as np

from agent.vision.decoders import Detection
from agent.vision.tracking import Track


def redact(
    rgb: np.ndarray,
    persons: list[Track | Detection],
    masks: list[list[tuple[float, float]]],
    head_fraction: float = 0.35,
) -> np.ndarray:
    """A copy with masks filled and person heads blurred; the input is left untouched."""
    image = rgb.copy()
    h, w = image.shape[:2]
    for polygon in masks:
        points = np.array([[round(x * w), round(y * h)] for x, y in polygon], dtype=np.int32)
        cv2.fillPoly(image, [points], (0, 0, 0))
    for person in persons:
        x1, y1, x2, y2 = person.box
        px1, px2 = max(0, int(x1 * w)), min(w, int(np.ceil(x2 * w)))
        py1 = max(0, int(y1 * h))
        py2 = min(h, int(np.ceil((y1 + (y2 - y1) * head_fraction) * h)))
        if px2 - px1 < 2 or py2 - py1 < 2:
            continue
        region = image[py1:py2, px1:px2]
        # Pixelate to a few blocks, then smooth: no facial detail survives, the shape does.
        small = cv2.resize(region, (max(1, (px2 - px1) // 12), max(1, (py2 - py1) // 12)), interpolation=cv2.INTER_AREA)
        blurred = cv2.resize(small, (px2 - px1, py2 - py1), interpolation=cv2.INTER_LINEAR)
        image[py1:py2, px1:px2] = cv2.GaussianBlur(blurred, (0, 0), sigmaX=3)
    return image


class EvidenceStore:
    def __init__(
        self,
        directory: Path,
        retention_s: float,
        jpeg_quality: int = 80,
        head_fraction: float = 0.35,
        masks: list[list[tuple[float, float]]] | None = None,
    ):
        self.directory = Path(directory)
        self.retention_s = retention_s
        self.jpeg_quality = jpeg_quality
        self.head_fraction = head_fraction
        self.masks = masks or []
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def save(self, rgb: np.ndarray, tracks: list[Track], event_id: str) -> dict:
        """Redact, encode and store; returns the reference that goes into the signed alert."""
        persons = [t for t in tracks if t.label == "person"]
        image = redact(rgb, persons, self.masks, self.head_fraction)
        ok, jpeg = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality]
        )
        if not ok:
            raise OSError("JPEG encoding of evidence failed")
        data = jpeg.tobytes()
        name = f"{event_id}.jpg"
        path = self.directory / name
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
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
