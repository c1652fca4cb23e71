"""Camera tamper: covered, blinded, defocused or turned away.

Measured on a small grey copy of each frame against a slowly learnt baseline
of the normal scene: brightness (covered → dark, blinded → saturated), detail
(variance of the Laplacian: covered, sprayed or defocused lenses lose it) and
similarity to the reference scene (turned away or moved: the whole scene
changes at once, which passers-by never do). The rule engine's Situation adds
the "sustained" part (min_duration_s) and hysteresis.
"""

from __future__ import annotations

import cv2
import numpy as np


class CameraTamperDetector:
    def __init__(
        self,
        learn_frames: int = 20,
        detail_ratio: float = 0.25,
        dark: float = 20.0,
        bright: float = 235.0,
        min_similarity: float = 0.4,
        alpha: float = 0.02,
    ):
        self.learn_frames = learn_frames
        self.detail_ratio = detail_ratio
        self.dark, self.bright = dark, bright
        self.min_similarity = min_similarity
        self.alpha = alpha
        self._seen = 0
        self._detail_baseline: float | None = None
        self._reference: np.ndarray | None = None

    def check(self, rgb: np.ndarray) -> tuple[str | None, dict[str, float]]:
        """The tamper reason for this frame (None when the view looks normal) and the measurements."""
        grey = cv2.cvtColor(cv2.resize(rgb, (160, 120), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
        brightness = float(grey.mean())
        detail = float(cv2.Laplacian(grey, cv2.CV_32F).var())
        similarity = self._similarity(grey)
        metrics = {
            "brightness": round(brightness, 1),
            "detail": round(detail, 1),
            "detail_baseline": round(self._detail_baseline or 0.0, 1),
            "similarity": round(similarity, 3),
        }
        if self._seen < self.learn_frames:
            self._learn(grey, detail, first=self._seen == 0)
            self._seen += 1
            return None, metrics
        reason = None
        if brightness < self.dark:
            reason = "covered"
        elif brightness > self.bright:
            reason = "blinded"
        elif detail < self.detail_ratio * (self._detail_baseline or 0.0):
            reason = "defocused"
        elif similarity < self.min_similarity:
            reason = "scene_changed"
        if reason is None:
            self._learn(grey, detail, first=False)
        return reason, metrics

    def _learn(self, grey: np.ndarray, detail: float, first: bool) -> None:
        if first or self._reference is None:
            self._reference, self._detail_baseline = grey.astype(np.float32), detail
            return
        cv2.accumulateWeighted(grey.astype(np.float32), self._reference, self.alpha)
        self._detail_baseline = (1 - self.alpha) * (self._detail_baseline or detail) + self.alpha * detail

    def _similarity(self, grey: np.ndarray) -> float:
        """Correlation of edge maps with the reference: 1 for the same scene, ~0 for another."""
        if self._reference is None:
            return 1.0
        current = cv2.Sobel(grey.astype(np.float32), cv2.CV_32F, 1, 1)
        reference = cv2.Sobel(self._reference, cv2.CV_32F, 1, 1)
        a, b = current - current.mean(), reference - reference.mean()
        denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
        return float((a * b).sum() / denominator) if denominator > 1e-6 else 0.0
