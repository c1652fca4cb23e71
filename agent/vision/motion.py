"""Motion gating: find where something moved, cheaply, and plan the regions worth running the model on.

Motion is judged on a small grey frame (about 160–200 px wide): on a Pi the
detection stream is already picamera2's small ``lores`` stream, elsewhere
``shrink_grey`` makes one with an integer-factor area resize (≈0.3 ms on a
768×576 frame, where a non-integer INTER_AREA costs 2.5 ms). Frame
differencing against a running-average background finds what changed;
privacy-mask and ignore areas are cut out of the difference, so they never
count as motion.

``RegionPlanner`` decides where the model runs, never at more than a bounded
cost: one square region around what moved when one suffices (small, distant
people are then seen at the model's own scale), otherwise the full frame plus
at most the zooms a token budget allows.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

Box = tuple[float, float, float, float]  # normalised x1, y1, x2, y2
Region = tuple[int, int, int, int]  # pixel x, y, width, height
Polygon = Sequence[tuple[float, float]]

SMALL_WIDTH = 160


def shrink_grey(rgb: np.ndarray, width: int = SMALL_WIDTH, exact: bool = True) -> np.ndarray:
    """A small grey copy, at least ``width`` wide, shrunk by an integer factor.

    ``exact``: averaged over every pixel (integer-factor INTER_AREA, ≈0.4 ms on
    768×576), for measures of detail; otherwise bilinear on the colour frame
    first (≈0.07 ms), enough for frame differencing, which blurs anyway.
    """
    factor = max(1, rgb.shape[1] // width)
    size = (rgb.shape[1] // factor, rgb.shape[0] // factor)
    if not exact and factor > 1:
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
        return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY) if small.ndim == 3 else small
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    return grey if factor == 1 else cv2.resize(grey, size, interpolation=cv2.INTER_AREA)


def polygon_mask(polygons: Sequence[Polygon], width: int, height: int) -> np.ndarray | None:
    """A uint8 mask, 0 inside any polygon (normalised points) and 1 elsewhere; None when there are none."""
    if not polygons:
        return None
    mask = np.ones((height, width), np.uint8)
    for polygon in polygons:
        points = np.array([[round(x * width), round(y * height)] for x, y in polygon], np.int32)
        cv2.fillPoly(mask, [points], 0)
    return mask


class MotionDetector:
    """Boxes around what moved; areas listed in ``excluded`` (privacy masks, ignore areas) never move."""

    def __init__(
        self,
        threshold: int = 25,
        min_area: float = 0.0005,
        width: int = SMALL_WIDTH,
        alpha: float = 0.1,
        excluded: Sequence[Polygon] = (),
    ):
        self.threshold = threshold
        self.min_area = min_area
        self.width = width
        self.alpha = alpha
        self.excluded = list(excluded)
        self._background: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Normalised boxes around what changed since the background."""
        small = shrink_grey(rgb, self.width, exact=False)
        grey = cv2.GaussianBlur(small, (3, 3), 0).astype(np.float32)
        small_h, small_w = grey.shape
        if self._background is None or self._background.shape != grey.shape:
            self._background = grey
            self._mask = polygon_mask(self.excluded, small_w, small_h)
            return []
        delta = cv2.absdiff(grey, self._background)
        cv2.accumulateWeighted(grey, self._background, self.alpha)
        moved = (delta > self.threshold).astype(np.uint8)
        if self._mask is not None:
            moved *= self._mask
        moved = cv2.dilate(moved, None, iterations=2)
        contours, _ = cv2.findContours(moved, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        boxes = []
        min_pixels = self.min_area * small_w * small_h
        for contour in contours:
            if cv2.contourArea(contour) < min_pixels:
                continue
            x, y, bw, bh = cv2.boundingRect(contour)
            boxes.append((x / small_w, y / small_h, (x + bw) / small_w, (y + bh) / small_h))
        return boxes


def cover(interest: list[Box], frame_w: int, frame_h: int, min_side: int, most: int = 64) -> list[Region]:
    """Square pixel regions, at least ``min_side`` wide, covering every box (stops after ``most`` + 1).

    Greedy: each box not yet inside a square gets one centred on it, which
    then also takes every other box that fits inside.
    """
    pixel_boxes = sorted(
        ((x1 * frame_w, y1 * frame_h, x2 * frame_w, y2 * frame_h) for x1, y1, x2, y2 in interest),
        key=lambda b: (b[2] - b[0]) * (b[3] - b[1]),
        reverse=True,
    )
    squares: list[Region] = []
    for x1, y1, x2, y2 in pixel_boxes:
        if any(_inside((x1, y1, x2, y2), square) for square in squares):
            continue
        side = int(min(max(min_side, (x2 - x1) * 1.2, (y2 - y1) * 1.2), frame_w, frame_h))
        x = int(np.clip((x1 + x2) / 2 - side / 2, 0, frame_w - side))
        y = int(np.clip((y1 + y2) / 2 - side / 2, 0, frame_h - side))
        squares.append((x, y, side, side))
        if len(squares) > most:
            break
    return squares


def tiles_for(interest: list[Box], frame_w: int, frame_h: int, side: int) -> list[tuple[Region, float]]:
    """Fixed tiles of the frame at the model's scale holding a small box of interest; each with its smallest area.

    Fixed places (a grid of overlapping squares) rather than squares centred on
    each frame's motion: a still object is then seen the same way each time it
    gets a zoom, which keeps its detections, and so its track, steady. Boxes
    over half a tile wide or tall are left to the full-frame pass.
    """
    if side * 1.5 > max(frame_w, frame_h):
        return []  # a zoom would hardly magnify
    xs, ys = _starts(frame_w, side), _starts(frame_h, side)
    best: dict[Region, float] = {}
    for x1, y1, x2, y2 in interest:
        bw, bh = (x2 - x1) * frame_w, (y2 - y1) * frame_h
        if max(bw, bh) > side / 2:
            continue
        cx, cy = (x1 + x2) / 2 * frame_w, (y1 + y2) / 2 * frame_h
        tx = min(xs, key=lambda x: abs(x + side / 2 - cx))
        ty = min(ys, key=lambda y: abs(y + side / 2 - cy))
        tile = (tx, ty, min(side, frame_w), min(side, frame_h))
        best[tile] = min(best.get(tile, float("inf")), bw * bh)
    return list(best.items())


def _starts(length: int, side: int) -> list[int]:
    """Evenly spaced starts of overlapping tiles of ``side`` covering ``length``."""
    if side >= length:
        return [0]
    count = -(-length // side)
    return [round(i * (length - side) / (count - 1)) for i in range(count)] if count > 1 else [0]


def _inside(box: tuple[float, float, float, float], region: Region) -> bool:
    rx, ry, rw, rh = region
    return rx <= box[0] and ry <= box[1] and box[2] <= rx + rw and box[3] <= ry + rh


class RegionPlanner:
    """Where the model runs on each frame, at a cost bounded by one full-frame pass plus a zoom budget.

    Cost is counted in model runs (each region is resized to the model input,
    so a region costs as much as the full frame). One region is never dearer
    than not gating; when more would be needed (a busy scene) or on the
    periodic full pass, the full frame runs, plus zooms on the smallest
    objects paid from a token bucket that fills by ``zoom_budget`` runs a
    frame (at most ``burst``). A busy scene thus costs at most
    ``1 + zoom_budget`` runs a frame on average; zooms take turns so every
    small object gets one now and then. Objects over half a tile are left to
    the full frame, and no zooms are planned where a tile would hardly
    magnify (the model's input over two thirds of the frame).
    """

    def __init__(self, min_side: int, max_zooms: int = 6, zoom_budget: float = 0.03, burst: float = 2.0):
        self.min_side = min_side
        self.max_zooms = max_zooms
        self.zoom_budget = zoom_budget
        self.burst = max(burst, zoom_budget)
        self.tokens = 0.0
        self._turn = 0
        self.runs = 0
        self.frames = 0

    def plan(self, interest: list[Box], frame_w: int, frame_h: int, full_pass: bool = False) -> list[Region]:
        """Regions for one frame: [] on a still frame; called once per frame so the budget fills evenly."""
        self.frames += 1
        self.tokens = min(self.burst, self.tokens + self.zoom_budget)
        full = (0, 0, frame_w, frame_h)
        if not full_pass:
            squares = cover(interest, frame_w, frame_h, self.min_side, most=1) if interest else []
            if not squares:
                return []
            if len(squares) == 1:
                region = squares[0]
                self.runs += 1
                return [full if region[2] >= min(frame_w, frame_h) else region]
        zooms = tiles_for(interest, frame_w, frame_h, self.min_side) if self.tokens >= 1 else []
        regions = [full] + self._spend(zooms)
        self.runs += len(regions)
        return regions

    def _spend(self, zooms: list[tuple[Region, float]]) -> list[Region]:
        """As many zooms as whole tokens allow, smallest objects first, taking turns across frames."""
        affordable = min(int(self.tokens), self.max_zooms, len(zooms))
        if affordable <= 0:
            return []
        ordered = [r for r, _ in sorted(zooms, key=lambda z: z[1])]
        start = self._turn % len(ordered)
        chosen = [ordered[(start + i) % len(ordered)] for i in range(affordable)]
        self._turn += affordable
        self.tokens -= affordable
        return chosen
