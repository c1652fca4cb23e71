"""Pictures for installers: what the model sees, where the zones are, what the masks hide."""

from __future__ import annotations

import cv2
import numpy as np

from agent.config.vision import VisionConfig
from agent.vision.detector import Detection
from agent.vision.evidence import redact

ZONE_COLOUR = (255, 200, 0)
BOX_COLOUR = (0, 255, 0)


def _pixels(polygon, w: int, h: int) -> np.ndarray:
    return np.array([[round(x * w), round(y * h)] for x, y in polygon], dtype=np.int32)


def annotate(rgb: np.ndarray, detections: list[Detection], config: VisionConfig | None = None) -> np.ndarray:
    """A copy of the frame with privacy masks applied, heads blurred, zones outlined and detections boxed.

    The picture is written to disk, so it gets the same redaction as evidence: nobody is recognisable.
    """
    masks = [m.polygon for m in config.privacy_masks] if config else []
    image = redact(rgb, [d for d in detections if d.label == "person"], masks)
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
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write image {path}")
