"""Thermal cameras: 16-bit radiometric frames kept as temperatures, shown to the detector in 8 bits.

A Lepton-class camera over UVC (Y16, PureThermal and similar) in TLinear mode
gives each pixel's temperature in hundredths of a kelvin. The detector needs an
8-bit, 3-channel picture: either a fixed range in °C (the same temperature is
always the same grey, so a warm person stays bright however hot the rest of the
scene gets) or a per-frame percentile stretch (for non-radiometric cameras).
Where the frame carries temperatures, a person candidate is kept only if enough
of its box has a body's apparent surface temperature: a poster, a reflection or
a shadow shaped like a person is not warm.
"""

from __future__ import annotations

import cv2
import numpy as np

from agent.config.vision import ThermalSection
from agent.vision.decoders import Detection

KELVIN_AT_0C = 273.15


class ThermalImage:
    """Turns Y16 counts into temperatures, an 8-bit picture, and gates person candidates."""

    def __init__(self, settings: ThermalSection):
        self.settings = settings
        self.rejected = 0  # person candidates dropped by the body-temperature band

    def temperatures(self, raw: np.ndarray) -> np.ndarray:
        """°C per pixel of a radiometric frame."""
        s = self.settings
        return raw.astype(np.float32) * s.kelvin_per_count + (s.offset_k - KELVIN_AT_0C)

    def to_rgb(self, raw: np.ndarray) -> np.ndarray:
        """The 8-bit, 3-channel picture the detector sees (white hot)."""
        s = self.settings
        if s.normalise == "fixed":
            values = self.temperatures(raw)
            low, high = s.range_c
        else:
            values = raw.astype(np.float32)
            low, high = (float(v) for v in np.percentile(values, s.percentiles))
            high = max(high, low + 1.0)
        grey = np.clip((values - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
        return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)

    def prepare(self, frame) -> None:
        """Give a frame that carries its 16-bit counts (``frame.raw``) the configured 8-bit picture, in place."""
        if frame.raw is None:
            return
        rgb = self.to_rgb(frame.raw)
        frame.rgb = frame.full = rgb

    def gate(self, detections: list[Detection], raw: np.ndarray | None) -> list[Detection]:
        """Drop person candidates too cold (or too hot) to be a body; other classes pass untouched."""
        s = self.settings
        if raw is None or not s.gates_persons:
            return detections
        temperatures = None
        kept = []
        for d in detections:
            if d.label == "person":
                temperatures = self.temperatures(raw) if temperatures is None else temperatures
                if self.body_share(temperatures, d.box) < s.body_fraction:
                    self.rejected += 1
                    continue
            kept.append(d)
        return kept

    def body_share(self, temperatures: np.ndarray, box: tuple[float, float, float, float]) -> float:
        """Share of the box's pixels within the body-temperature band."""
        h, w = temperatures.shape[:2]
        x1, y1 = int(box[0] * w), int(box[1] * h)
        x2, y2 = max(x1 + 1, int(np.ceil(box[2] * w))), max(y1 + 1, int(np.ceil(box[3] * h)))
        inside = temperatures[y1:y2, x1:x2]
        if inside.size == 0:
            return 0.0
        low, high = self.settings.body_c
        return float(np.count_nonzero((inside >= low) & (inside <= high))) / inside.size
