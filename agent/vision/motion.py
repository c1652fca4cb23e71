"""Motion gating: find where something moved, cheaply, and plan the regions worth running the model on.

Frame differencing against a running-average background on a small grey
frame (Frigate's main efficiency lever). Regions are squares around motion
and tracked objects, at least the model's input size, so small people far
away are seen at full resolution instead of being shrunk with the whole frame.
"""

from __future__ import annotations

import cv2
import numpy as np

Box = tuple[float, float, float, float]  # normalised x1, y1, x2, y2
Region = tuple[int, int, int, int]  # pixel x, y, width, height


class MotionDetector:
    def __init__(self, threshold: int = 25, min_area: float = 0.0005, width: int = 320, alpha: float = 0.1):
        self.threshold = threshold
        self.min_area = min_area
        self.width = width
        self.alpha = alpha
        self._background: np.ndarray | None = None

    def detect(self, rgb: np.ndarray) -> list[Box]:
        """Normalised boxes around what changed since the background."""
        h, w = rgb.shape[:2]
        small_h = max(1, round(h * self.width / w))
        grey = cv2.cvtColor(cv2.resize(rgb, (self.width, small_h), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
        grey = cv2.GaussianBlur(grey, (5, 5), 0).astype(np.float32)
        if self._background is None or self._background.shape != grey.shape:
            self._background = grey
            return []
        delta = cv2.absdiff(grey, self._background)
        cv2.accumulateWeighted(grey, self._background, self.alpha)
        mask = cv2.dilate((delta > self.threshold).astype(np.uint8), None, iterations=2)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        boxes = []
        min_pixels = self.min_area * self.width * small_h
        for contour in contours:
            if cv2.contourArea(contour) < min_pixels:
                continue
            x, y, bw, bh = cv2.boundingRect(contour)
            boxes.append((x / self.width, y / small_h, (x + bw) / self.width, (y + bh) / small_h))
        return boxes


def plan_regions(interest: list[Box], frame_w: int, frame_h: int, min_side: int, max_regions: int = 4) -> list[Region]:
    """Square pixel regions, at least ``min_side`` wide, covering every box of interest.

    Greedy cover: each box not yet inside a region gets a square centred on it,
    which then also takes every other box that fits inside. Small objects are
    thus seen at the model's own scale. When more than ``max_regions`` squares
    would be needed, or they would cover most of the frame, one full frame is cheaper.
    """
    if not interest:
        return []
    full = [(0, 0, frame_w, frame_h)]
    pixel_boxes = sorted(
        ((x1 * frame_w, y1 * frame_h, x2 * frame_w, y2 * frame_h) for x1, y1, x2, y2 in interest),
        key=lambda b: (b[2] - b[0]) * (b[3] - b[1]),
        reverse=True,
    )
    regions: list[Region] = []
    for x1, y1, x2, y2 in pixel_boxes:
        if any(rx <= x1 and ry <= y1 and x2 <= rx + rs and y2 <= ry + rs for rx, ry, rs, _ in regions):
            continue
        side = int(min(max(min_side, (x2 - x1) * 1.2, (y2 - y1) * 1.2), frame_w, frame_h))
        x = int(np.clip((x1 + x2) / 2 - side / 2, 0, frame_w - side))
        y = int(np.clip((y1 + y2) / 2 - side / 2, 0, frame_h - side))
        regions.append((x, y, side, side))
        if len(regions) > max_regions:
            return full
    if sum(w * h for _, _, w, h in regions) > 1.5 * frame_w * frame_h:
        return full
    return regions
