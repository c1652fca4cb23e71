"""Camera tamper: covered (wholly or in part), blinded, defocused or turned away; and lights that changed.

Measured on a small grey copy of each frame (``motion.shrink_grey``) against a
slowly learnt baseline of the normal scene. Every measure is chosen so that a
change of lighting, which scales the picture's values, leaves it alone:

* focus is contrast-normalised: mean |Laplacian| ÷ standard deviation. Blur
  lowers it; dimming lowers both parts alike and leaves it (a raw Laplacian
  variance falls with the square of the light and called lights-off "defocused");
* partial cover: the frame is cut into a grid of cells; a cell is obscured
  when its detail (mean |Laplacian|) fell below ``obscured_ratio`` of the
  frame's typical change (the 75th percentile of all cells' detail ratios,
  which follows the lighting). A hand, a bag or paint over part of the lens
  flattens its cells while the others keep theirs;
* blinding: the share of saturated pixels rises (a torch, a laser, the sun);
* similarity: correlation of edge maps with the reference scene, 1 for the
  same scene whatever its light, ~0 for another (camera turned) or none.

A large brightness change with the scene, focus and cells intact is a
lighting change: reported once as ``lights_changed``, never as tamper, and the
brightness baseline moves to the new light. The rule engine's Situation adds
the "sustained" part (min_duration_s) and hysteresis.

Thresholds (defaults), measured on vtest.avi (docs/benchmarks.md, tamper):

========================  =====  ==================================================================
``dark``                  20     mean grey below this *and* the scene gone (similarity low): covered
``bright``                235    mean grey above this: blinded
``blind_saturated``       0.33   share of saturated (≥ 250) pixels above the baseline's: blinded
``cover_fraction``        0.40   share of textured cells obscured: covered (part of the lens)
``obscured_ratio``        0.25   a cell's detail ratio below this × the typical ratio: obscured
``focus_ratio``           0.55   normalised focus below this × baseline: defocused
``min_similarity``        0.40   edge correlation with the reference below this: scene_changed
``lights_ratio``          1.5    brightness ×/÷ this against the baseline: lights_changed
========================  =====  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from agent.vision.motion import shrink_grey

GRID = (8, 6)  # cells across, down
TEXTURED = 1.5  # a cell with less baseline detail than this (grey levels) says nothing about cover


@dataclass
class TamperLook:
    """One look at the view: the tamper reason (None when it looks normal), a lighting change, the measures."""

    reason: str | None
    lights_changed: str | None = None  # "darker" / "brighter"
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Measures:
    grey: np.ndarray
    brightness: float
    focus: float
    saturated: float
    cells: np.ndarray


class CameraTamperDetector:
    def __init__(
        self,
        learn_frames: int = 20,
        focus_ratio: float = 0.55,
        dark: float = 20.0,
        bright: float = 235.0,
        blind_saturated: float = 0.33,
        cover_fraction: float = 0.40,
        obscured_ratio: float = 0.25,
        min_similarity: float = 0.4,
        lights_ratio: float = 1.5,
        alpha: float = 0.02,
    ):
        self.learn_frames = learn_frames
        self.focus_ratio = focus_ratio
        self.dark, self.bright = dark, bright
        self.blind_saturated = blind_saturated
        self.cover_fraction, self.obscured_ratio = cover_fraction, obscured_ratio
        self.min_similarity = min_similarity
        self.lights_ratio = lights_ratio
        self.alpha = alpha
        self._seen = 0
        self._base: _Measures | None = None
        self._reference: np.ndarray | None = None

    def check(self, rgb: np.ndarray) -> TamperLook:
        """Judge one frame against the learnt normal view."""
        now = self._measure(rgb)
        if self._base is None or self._seen < self.learn_frames:
            self._learn(now)
            self._seen += 1
            return TamperLook(None, None, self._metrics(now, 1.0, 0.0))
        similarity = self._similarity(now.grey)
        covered = self._covered_fraction(now.cells)
        metrics = self._metrics(now, similarity, covered)
        reason = self._reason(now, similarity, covered)
        if reason is not None:
            return TamperLook(reason, None, metrics)
        lights = self._lights(now.brightness)
        if lights is not None:
            self._base.brightness = now.brightness  # the new light is the new normal: said once
        self._learn(now)
        return TamperLook(None, lights, metrics)

    def _reason(self, now: _Measures, similarity: float, covered: float) -> str | None:
        base = self._base
        if now.brightness > self.bright or now.saturated - base.saturated > self.blind_saturated:
            return "blinded"
        if now.brightness < self.dark and similarity < self.min_similarity:
            return "covered"
        if covered >= self.cover_fraction:
            return "covered"
        if now.focus < self.focus_ratio * base.focus:
            return "defocused"
        if similarity < self.min_similarity:
            return "scene_changed"
        return None

    def _lights(self, brightness: float) -> str | None:
        before = max(self._base.brightness, 1.0)
        if brightness > before * self.lights_ratio:
            return "brighter"
        if brightness * self.lights_ratio < before:
            return "darker"
        return None

    @staticmethod
    def _measure(rgb: np.ndarray) -> _Measures:
        grey = shrink_grey(rgb).astype(np.float32)
        detail = np.abs(cv2.Laplacian(grey, cv2.CV_32F))
        spread = float(grey.std())
        cells = cv2.resize(detail, GRID, interpolation=cv2.INTER_AREA)
        return _Measures(
            grey=grey,
            brightness=float(grey.mean()),
            focus=float(detail.mean()) / max(spread, 1.0),
            saturated=float((grey >= 250).mean()),
            cells=cells,
        )

    def _covered_fraction(self, cells: np.ndarray) -> float:
        """Share of the baseline's textured cells that lost their detail against the frame's typical change."""
        textured = self._base.cells >= TEXTURED
        if not textured.any():
            return 0.0
        ratios = cells[textured] / self._base.cells[textured]
        typical = float(np.percentile(ratios, 75))
        return float((ratios < self.obscured_ratio * typical).mean())

    def _learn(self, now: _Measures) -> None:
        if self._base is None:
            self._base, self._reference = now, now.grey.copy()
            return
        a, base = self.alpha if self._seen >= self.learn_frames else 1.0 / (self._seen + 1), self._base
        cv2.accumulateWeighted(now.grey, self._reference, a)
        base.brightness += a * (now.brightness - base.brightness)
        base.focus += a * (now.focus - base.focus)
        base.saturated += a * (now.saturated - base.saturated)
        base.cells += a * (now.cells - base.cells)

    def _similarity(self, grey: np.ndarray) -> float:
        """Correlation of edge maps with the reference: 1 for the same scene, ~0 for another."""
        current = cv2.Sobel(grey, cv2.CV_32F, 1, 1)
        reference = cv2.Sobel(self._reference, cv2.CV_32F, 1, 1)
        a, b = current - current.mean(), reference - reference.mean()
        denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
        return float((a * b).sum() / denominator) if denominator > 1e-6 else 0.0

    def _metrics(self, now: _Measures, similarity: float, covered: float) -> dict[str, float]:
        base = self._base or now
        return {
            "brightness": round(now.brightness, 1),
            "brightness_baseline": round(base.brightness, 1),
            "focus": round(now.focus, 3),
            "focus_baseline": round(base.focus, 3),
            "saturated": round(now.saturated, 3),
            "covered_fraction": round(covered, 3),
            "similarity": round(similarity, 3),
        }
