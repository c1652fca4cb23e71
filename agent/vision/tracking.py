"""Stable track ids across frames (norfair's Kalman tracker, as Frigate uses) plus what rules need from a track.

Each track keeps its label, a short score history (rules filter on the
median, not one lucky frame), when it was first seen, and whether it has
stood still: its box centre has stayed within a fraction of its own size
for ``stationary_s`` seconds.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from norfair import Detection as NorfairDetection
from norfair import Tracker
from norfair.distances import VectorizedDistance

from agent.vision.detector import Detection


@dataclass
class Track:
    id: int
    label: str
    box: tuple[float, float, float, float]
    first_seen: float
    last_seen: float
    scores: deque = field(default_factory=lambda: deque(maxlen=10))
    anchor: tuple[float, float] | None = None  # where it has been standing still since anchor_time
    anchor_time: float = 0.0

    @property
    def median_score(self) -> float:
        return statistics.median(self.scores) if self.scores else 0.0

    @property
    def bottom_centre(self) -> tuple[float, float]:
        x1, _, x2, y2 = self.box
        return ((x1 + x2) / 2, y2)

    @property
    def size(self) -> float:
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])

    def stationary_for(self, now: float) -> float:
        return 0.0 if self.anchor is None else now - self.anchor_time

    def as_dict(self) -> dict:
        return {
            "track_id": self.id,
            "label": self.label,
            "box": [round(v, 4) for v in self.box],
            "score": round(self.median_score, 3),
        }


def scaled_centre_distances(candidates: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Distances between box centres in units of box height, for all pairs at once.

    Rows are boxes raveled as ``x1, y1, x2, y2``. IoU fails for the small,
    far-away people of a wide street view (one step is a large part of a
    20-pixel box); on vtest this keeps 29 ids over 200 frames where IoU made 74.
    """
    c_centre = (candidates[:, :2] + candidates[:, 2:]) / 2
    o_centre = (objects[:, :2] + objects[:, 2:]) / 2
    height = np.maximum((candidates[:, 3] - candidates[:, 1])[:, None], (objects[:, 3] - objects[:, 1])[None, :])
    return np.linalg.norm(c_centre[:, None, :] - o_centre[None, :, :], axis=2) / np.maximum(height, 1e-3)


class ObjectTracker:
    """Associates detections over time; one ``update`` per processed frame."""

    def __init__(
        self,
        distance_threshold: float = 1.0,
        hit_counter_max: int = 30,
        initialization_delay: int = 2,
        stationary_tolerance: float = 0.25,
    ):
        self._tracker = Tracker(
            distance_function="iou",  # replaced below: this norfair only takes names or scalar functions here
            distance_threshold=distance_threshold,
            hit_counter_max=hit_counter_max,
            initialization_delay=initialization_delay,
        )
        self._tracker.distance_function = VectorizedDistance(scaled_centre_distances)
        self.stationary_tolerance = stationary_tolerance
        self.tracks: dict[int, Track] = {}

    def update(self, detections: list[Detection], now: float, period: int = 1) -> list[Track]:
        """Feed one frame's detections; returns the live tracks (confirmed by norfair)."""
        norfair_detections = [
            NorfairDetection(
                points=np.array([[d.box[0], d.box[1]], [d.box[2], d.box[3]]]),
                scores=np.array([d.score, d.score]),
                label=d.label,
                data=d,
            )
            for d in detections
        ]
        live = self._tracker.update(detections=norfair_detections, period=period)
        this_frame = {id(d) for d in norfair_detections}
        seen = set()
        for obj in live:
            track_id = obj.global_id if obj.global_id is not None else obj.id
            seen.add(track_id)
            estimate = obj.estimate
            box = tuple(float(np.clip(v, 0.0, 1.0)) for v in (*estimate[0], *estimate[1]))
            track = self.tracks.get(track_id)
            if track is None:
                track = self.tracks[track_id] = Track(track_id, obj.label, box, now, now)
            track.box = box
            if obj.last_detection is not None and id(obj.last_detection) in this_frame:  # matched now
                track.scores.append(obj.last_detection.data.score)
                track.last_seen = now
            self._update_stationary(track, now)
        for gone in set(self.tracks) - seen:
            del self.tracks[gone]
        return [self.tracks[i] for i in sorted(seen)]

    def _update_stationary(self, track: Track, now: float) -> None:
        centre = ((track.box[0] + track.box[2]) / 2, (track.box[1] + track.box[3]) / 2)
        tolerance = self.stationary_tolerance * max(track.size, 0.01)
        if (
            track.anchor is None
            or abs(centre[0] - track.anchor[0]) > tolerance
            or abs(centre[1] - track.anchor[1]) > tolerance
        ):
            track.anchor, track.anchor_time = centre, now
