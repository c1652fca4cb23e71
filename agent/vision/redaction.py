"""Redaction that does not depend on the person detector: a face detector over the whole picture.

Every picture that leaves the pipeline (evidence, snapshots, installer pictures) goes through
``Redactor.redact`` first. Faces are found by a dedicated face model (MediaPipe BlazeFace, run by the
same LiteRT runtime as the person detector) on the full-size picture, at several scales: the picture
shrunk into the model (faces that fill it), the whole picture, and overlapping tiles down to
``min_face_px`` (within a budget of model runs). Each face found is filled with one colour, the
mean of its surroundings: nothing is recoverable at any size, and even a mosaic of three blocks
still reads as a head to a face detector. The model then looks again around what it covered, and
covers what it still finds. The head region of every person box, confirmed or not and whatever its
class filter, is covered by a mosaic of a few blocks scaled to the person's width, so a face too
small for the tiles is covered too. Only boxes are used: no keypoints, no embeddings, nothing about
a face is kept.

When the face model is missing or fails, ``redact`` raises ``RedactionUnavailable``: the caller
writes no picture and says why.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.errors import ModelError, RedactionUnavailable

log = logging.getLogger(__name__)

#: Face sizes a BlazeFace model finds reliably, as fractions of its input side (measured on real faces:
#: full range 8–96 px of 192, short range 12–150 px of 128), with a margin on both ends.
FACE_RANGE_BY_SIDE: dict[int, tuple[float, float]] = {192: (10 / 192, 0.45), 128: (14 / 128, 0.95)}
#: Boxes are widened by these fractions of the face box (left/right, top, bottom): hair, ears, chin.
FACE_MARGIN = (0.25, 0.45, 0.2)
#: Fill colour when a face has no surroundings to take one from (faces take the mean of a ring around them).
FACE_FILL = (128, 128, 128)
#: After covering, the face model looks again around what it covered, this many times at most.
VERIFY_ROUNDS = 2
#: Blocks across a person's head region (the upper part of the box, a face being about a third of its width).
BLOCKS_ACROSS_HEAD = 6
MASK_COLOUR = (0, 0, 0)


@dataclass(frozen=True)
class Tile:
    """A square of the picture (may reach past its edges) given to the face model."""

    x: int
    y: int
    side: int


def plan_tiles(
    width: int, height: int, face_range: tuple[float, float], min_face_px: float, max_tiles: int, overlap: float = 1 / 3
) -> tuple[list[Tile], float]:
    """Tiles from coarse to fine so that every face from ``min_face_px`` up to the whole picture falls
    fully inside a tile where it is of a size the model finds; returns them and the smallest face size
    covered (larger than ``min_face_px`` when ``max_tiles`` does not allow that fine a level)."""
    low, high = face_range
    long_side = max(width, height)
    tiles: list[Tile] = []
    if high < 0.95:  # faces that fill the picture: shrink the whole picture into part of the input
        zoom_out = math.ceil(long_side / high)
        tiles.append(Tile((long_side - zoom_out) // 2, (long_side - zoom_out) // 2, zoom_out))
    tiles.append(Tile(0, 0, long_side))
    side = long_side
    covered = low * long_side
    while covered > min_face_px:
        # the next level's largest face that surely lies inside one tile must reach this level's smallest
        finer = max(math.ceil(min_face_px / low), math.ceil(low * side / (min(high, overlap) * 0.7)))
        if finer >= side:
            break
        side = finer
        level = _grid(width, height, side, overlap)
        if len(tiles) + len(level) > max_tiles:
            break
        tiles.extend(level)
        covered = low * side
    return tiles, covered


def _grid(width: int, height: int, side: int, overlap: float) -> list[Tile]:
    step = max(1, int(side * (1 - overlap)))

    def starts(length: int) -> list[int]:
        if side >= length:
            return [(length - side) // 2]
        count = math.ceil((length - side) / step) + 1
        return [round(i * (length - side) / (count - 1)) for i in range(count)]

    return [Tile(x, y, side) for y in starts(height) for x in starts(width)]


Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels


def _touches(tile: Tile, box: Box) -> bool:
    return box[0] < tile.x + tile.side and box[2] > tile.x and box[1] < tile.y + tile.side and box[3] > tile.y


class FaceFinder:
    """A BlazeFace detector run over tiles; faces come out as pixel boxes (x1, y1, x2, y2)."""

    def __init__(self, detector, min_face_px: float = 16, max_tiles: int = 48):
        side = detector.width
        if side not in FACE_RANGE_BY_SIDE or detector.spec.family != "blazeface":
            raise ModelError(f"{detector.spec.name!r} is not a BlazeFace face model with a known input size")
        self.detector = detector
        self.face_range = FACE_RANGE_BY_SIDE[side]
        self.min_face_px = min_face_px
        self.max_tiles = max_tiles
        self.last_min_face_px = 0.0
        self.last_tiles = 0

    def find(self, rgb: np.ndarray, near: list[tuple[int, int, int, int]] | None = None) -> list[Box]:
        """Faces anywhere in the picture, or only in the tiles that touch one of the boxes ``near``."""
        h, w = rgb.shape[:2]
        tiles, self.last_min_face_px = plan_tiles(w, h, self.face_range, self.min_face_px, self.max_tiles)
        if near is not None:
            tiles = [t for t in tiles if any(_touches(t, box) for box in near)]
        self.last_tiles = len(tiles)
        faces = []
        for tile in tiles:
            faces.extend(self._in_square(rgb, tile))
        return faces

    def _in_square(self, rgb: np.ndarray, tile: Tile) -> list[tuple[int, int, int, int]]:
        """Faces in a square that may reach past the picture: the outside is padded grey."""
        h, w = rgb.shape[:2]
        x1, y1 = max(0, tile.x), max(0, tile.y)
        x2, y2 = min(w, tile.x + tile.side), min(h, tile.y + tile.side)
        if x2 <= x1 or y2 <= y1:
            return []
        crop = rgb[y1:y2, x1:x2]
        if tile.side > max(x2 - x1, y2 - y1) * 1.05:  # zoomed out: place the crop in a padded square
            scale = self.detector.width / tile.side
            small = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))))
            canvas = np.full((self.detector.height, self.detector.width, 3), 114, np.uint8)
            ox, oy = round((x1 - tile.x) * scale), round((y1 - tile.y) * scale)
            canvas[oy : oy + small.shape[0], ox : ox + small.shape[1]] = small[
                : canvas.shape[0] - oy, : canvas.shape[1] - ox
            ]
            found = self.detector.detect(canvas)
            return [self._pixels(d.box, tile.x, tile.y, tile.side, tile.side, w, h) for d in found if d.label == "face"]
        found = self.detector.detect(crop)
        return [self._pixels(d.box, x1, y1, x2 - x1, y2 - y1, w, h) for d in found if d.label == "face"]

    @staticmethod
    def _pixels(box, ox: int, oy: int, bw: int, bh: int, w: int, h: int) -> tuple[int, int, int, int]:
        x1, y1, x2, y2 = box
        return (
            max(0, int(ox + x1 * bw)),
            max(0, int(oy + y1 * bh)),
            min(w, math.ceil(ox + x2 * bw)),
            min(h, math.ceil(oy + y2 * bh)),
        )


def mosaic(image: np.ndarray, box: tuple[int, int, int, int], blocks_across: int) -> None:
    """Replace ``box`` in place by a mosaic of about ``blocks_across`` blocks across its width."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    if bw < 1 or bh < 1:
        return
    across = max(1, min(blocks_across, bw))
    block = max(1, bw / across)
    down = max(1, round(bh / block))
    region = image[y1:y2, x1:x2]
    small = cv2.resize(region, (across, down), interpolation=cv2.INTER_AREA)
    image[y1:y2, x1:x2] = cv2.resize(small, (bw, bh), interpolation=cv2.INTER_NEAREST)


def fill(image: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Fill ``box`` in place with one colour, the mean of a ring around it: no face detail is left, and the
    patch blends into its surroundings rather than reading as a head (a grey block on shoulders does)."""
    x1, y1, x2, y2 = box
    h, w = image.shape[:2]
    pad = max(2, (x2 - x1) // 6)
    ring = image[max(0, y1 - pad) : min(h, y2 + pad), max(0, x1 - pad) : min(w, x2 + pad)].reshape(-1, 3)
    image[y1:y2, x1:x2] = ring.mean(axis=0).astype(np.uint8) if len(ring) else FACE_FILL


def widen(face: tuple[int, int, int, int], w: int, h: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = face
    fw, fh = x2 - x1, y2 - y1
    side, top, bottom = FACE_MARGIN
    return (
        max(0, int(x1 - side * fw)),
        max(0, int(y1 - top * fh)),
        min(w, math.ceil(x2 + side * fw)),
        min(h, math.ceil(y2 + bottom * fh)),
    )


class Redactor:
    """Masks, person heads and every face found: what any picture goes through before it is written or sent."""

    def __init__(
        self,
        faces: FaceFinder | None,
        masks: list[list[tuple[float, float]]] | None = None,
        head_fraction: float = 0.35,
        unavailable: str | None = None,
    ):
        if faces is None and unavailable is None:
            raise ValueError("a Redactor without a face finder needs the reason it has none")
        self.faces = faces
        self.masks = masks or []
        self.head_fraction = head_fraction
        self.unavailable = unavailable
        self.last_ms = 0.0
        self.last_faces = 0

    @classmethod
    def load(
        cls,
        model: str,
        model_dir: Path,
        masks: list[list[tuple[float, float]]] | None = None,
        head_fraction: float = 0.35,
        min_face_px: float = 16,
        min_score: float = 0.4,
        runtime: str = "auto",
        num_threads: int = 2,
    ) -> Redactor:
        """The face model named in the manifest; a Redactor that refuses to redact (and says why) when it
        cannot be loaded, so a missing face model withholds pictures but never stops detection."""
        from agent.vision.detector import Detector
        from models import find_model

        try:
            detector = Detector(find_model(model), model_dir, num_threads, runtime, False, min_score)
            return cls(FaceFinder(detector, min_face_px), masks, head_fraction)
        except ModelError as exc:
            reason = f"face model for redaction unavailable: {exc}"
            log.error("%s; pictures will be withheld", reason)
            return cls(None, masks, head_fraction, unavailable=reason)

    @classmethod
    def for_camera(cls, config, model_dir: Path) -> Redactor:
        """The redactor a camera's config describes: its ``[evidence]`` face settings and privacy masks."""
        evidence = config.evidence
        return cls.load(
            evidence.face_model,
            model_dir,
            [m.polygon for m in config.privacy_masks],
            evidence.head_fraction,
            evidence.min_face_px,
            evidence.face_min_score,
            config.detector.runtime,
            config.detector.num_threads,
        )

    def redact(self, rgb: np.ndarray, person_boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
        """A copy with person heads and all faces covered, then the privacy masks filled; raises ``RedactionUnavailable``."""
        if self.faces is None:
            raise RedactionUnavailable(self.unavailable or "no face model")
        start = time.perf_counter()
        image = rgb.copy()
        h, w = image.shape[:2]
        heads = [self._head(box, w, h) for box in person_boxes]
        heads = [r for r in heads if r[2] - r[0] >= 2 and r[3] - r[1] >= 2]
        try:
            faces = self.faces.find(rgb)
            for head in heads:
                mosaic(image, head, BLOCKS_ACROSS_HEAD)
            covered = self._cover(image, faces)
            for _ in range(VERIFY_ROUNDS):  # look again where faces were covered: a part left over is covered too
                again = self.faces.find(image, near=covered)
                if not again:
                    break
                faces += again
                covered = self._cover(image, again)
        except (RuntimeError, ValueError, cv2.error) as exc:  # an interpreter that fails mid-run
            raise RedactionUnavailable(f"face detection failed: {str(exc).strip()[:200]}") from None
        for polygon in self.masks:  # last: a head's mosaic next to a mask never carries colour back into it
            points = np.array([[round(x * w), round(y * h)] for x, y in polygon], dtype=np.int32)
            cv2.fillPoly(image, [points], MASK_COLOUR)
        self.last_faces = len(faces)
        self.last_ms = (time.perf_counter() - start) * 1000
        return image

    @staticmethod
    def _cover(image: np.ndarray, faces: list[Box]) -> list[Box]:
        h, w = image.shape[:2]
        boxes = [widen(face, w, h) for face in faces]
        for box in boxes:
            fill(image, box)
        return boxes

    def _head(self, box, w: int, h: int) -> tuple[int, int, int, int]:
        x1, y1, x2, y2 = box
        return (
            max(0, int(x1 * w)),
            max(0, int(y1 * h)),
            min(w, math.ceil(x2 * w)),
            min(h, math.ceil((y1 + (y2 - y1) * self.head_fraction) * h)),
        )


def person_boxes(*groups) -> list[tuple[float, float, float, float]]:
    """Boxes of every person among tracks and detections, whatever their score, class filter or confirmation."""
    return [item.box for group in groups for item in group if getattr(item, "label", None) == "person"]
