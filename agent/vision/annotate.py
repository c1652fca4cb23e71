"""Pictures for installers: what the model sees, where the zones are, what the masks hide.

They are written to disk, so they get the same redaction as evidence (``Redactor``): nobody is
recognisable, and when the redaction cannot run no picture is drawn at all.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from agent.config.vision import VisionConfig
from agent.runtime.files import write_file_atomically
from agent.vision.detector import Detection
from agent.vision.redaction import Redactor, person_boxes

ZONE_COLOUR = (255, 200, 0)
BOX_COLOUR = (0, 255, 0)


def _pixels(polygon, w: int, h: int) -> np.ndarray:
    return np.array([[round(x * w), round(y * h)] for x, y in polygon], dtype=np.int32)


def annotate(
    rgb: np.ndarray, detections: list[Detection], redactor: Redactor, config: VisionConfig | None = None
) -> np.ndarray:
    """A redacted copy of the frame (masks, heads, faces) with zones outlined and detections boxed.

    Raises ``RedactionUnavailable`` when the redactor cannot run; the privacy masks are the redactor's
    (``Redactor.load(..., masks=...)`` from the same config).
    """
    image = redactor.redact(rgb, person_boxes(detections))
    h, w = image.shape[:2]
    if config is not None:
        for zone in config.zones:
            points = _pixels(zone.polygon, w, h)
            cv2.polylines(image, [points], isClosed=True, color=ZONE_COLOUR, thickness=2)
            cv2.putText(
                image,
                zone.name,
                tuple(int(v) for v in points[0] + [4, 16]),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.5,
                ZONE_COLOUR,
                1,
                cv2.LINE_AA,
            )
    for d in detections:
        x1, y1, x2, y2 = (int(d.box[0] * w), int(d.box[1] * h), int(d.box[2] * w), int(d.box[3] * h))
        cv2.rectangle(image, (x1, y1), (x2, y2), BOX_COLOUR, 2)
        cv2.putText(
            image,
            f"{d.label} {d.score:.2f}",
            (x1, max(12, y1 - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            BOX_COLOUR,
            1,
            cv2.LINE_AA,
        )
    return image


def write_png(path, rgb: np.ndarray) -> None:
    """Write a picture readable by its owner only (0600), whatever the umask."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode image {path}")
    write_file_atomically(Path(path), png.tobytes(), 0o600)
