"""Fisheye and panorama frames made from real footage by a known projection, and where its people land.

Written apart from ``agent.vision.projection`` (angles and a pinhole, no shared code), so the tests
check the library's geometry against an independent statement of the same lens models. The
original vtest frame is treated as a pinhole camera with ``SOURCE_HFOV`` degrees across, turned by
``yaw`` degrees to the right of the 360° camera's forward direction.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

SOURCE_HFOV = 60.0


def _pinhole_turn(yaw_deg: float, pitch_deg: float = 0.0) -> np.ndarray:
    """Pinhole directions → world directions (x right, y down, z forward): tilted up by pitch, turned right by yaw."""
    a, b = math.radians(yaw_deg), math.radians(pitch_deg)
    turn = np.array([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]])
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(b), -math.sin(b)], [0.0, math.sin(b), math.cos(b)]])
    return turn @ tilt


#: World → fisheye directions for a lens looking straight down, the top of its image towards yaw 0.
CEILING = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def _pinhole_focal(width: int) -> float:
    return (width / 2) / math.tan(math.radians(SOURCE_HFOV) / 2)


def fisheye_from_perspective(
    rgb: np.ndarray, size: int, yaw: float, lens_fov: float = 180.0, pitch: float = 0.0, ceiling: bool = False
) -> np.ndarray:
    """A square equidistant fisheye frame (lens circle touching the edges) showing ``rgb`` at ``yaw``/``pitch``;
    the lens looks forward, or straight down (``ceiling``)."""
    h, w = rgb.shape[:2]
    u, v = _fisheye_maps(w, h, size, yaw, lens_fov, pitch, ceiling)
    return cv2.remap(rgb, u, v, cv2.INTER_LINEAR, borderValue=(0, 0, 0))


@functools.lru_cache(maxsize=4)
def _fisheye_maps(
    w: int, h: int, size: int, yaw: float, lens_fov: float, pitch: float, ceiling: bool
) -> tuple[np.ndarray, np.ndarray]:
    radius = size / 2
    py, px = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = px - size / 2, py - size / 2
    theta = np.hypot(dx, dy) / radius * math.radians(lens_fov) / 2
    phi = np.arctan2(dy, dx)
    rays = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], axis=-1)
    if ceiling:
        rays = rays @ CEILING  # row vectors: fisheye → world
    pin = rays @ _pinhole_turn(yaw, pitch)  # row vectors: R^T applied, world → pinhole
    f = _pinhole_focal(w)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(pin[..., 2] > 1e-6, f * pin[..., 0] / pin[..., 2] + w / 2 - 0.5, -1)
        v = np.where(pin[..., 2] > 1e-6, f * pin[..., 1] / pin[..., 2] + h / 2 - 0.5, -1)
    return u.astype(np.float32), v.astype(np.float32)


def panorama_from_perspective(rgb: np.ndarray, width: int, yaw: float) -> np.ndarray:
    """A 2:1 equirectangular panorama showing ``rgb`` at ``yaw``."""
    h, w = rgb.shape[:2]
    u, v = _panorama_maps(w, h, width, yaw)
    return cv2.remap(rgb, u, v, cv2.INTER_LINEAR, borderValue=(0, 0, 0))


@functools.lru_cache(maxsize=2)
def _panorama_maps(w: int, h: int, width: int, yaw: float) -> tuple[np.ndarray, np.ndarray]:
    height = width // 2
    py, px = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    lon = (px / width - 0.5) * 2 * math.pi
    lat = (0.5 - py / height) * math.pi
    rays = np.stack([np.cos(lat) * np.sin(lon), -np.sin(lat), np.cos(lat) * np.cos(lon)], axis=-1)
    pin = rays @ _pinhole_turn(yaw)
    f = _pinhole_focal(w)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(pin[..., 2] > 1e-6, f * pin[..., 0] / pin[..., 2] + w / 2 - 0.5, -1)
        v = np.where(pin[..., 2] > 1e-6, f * pin[..., 1] / pin[..., 2] + h / 2 - 0.5, -1)
    return u.astype(np.float32), v.astype(np.float32)


def _perspective_rays(points: np.ndarray, w: int, h: int, yaw: float, pitch: float = 0.0) -> np.ndarray:
    f = _pinhole_focal(w)
    rays = np.stack([(points[:, 0] * w - w / 2) / f, (points[:, 1] * h - h / 2) / f, np.ones(len(points))], axis=1)
    return rays @ _pinhole_turn(yaw, pitch).T


def _outline(box) -> np.ndarray:
    x1, y1, x2, y2 = box
    t = np.linspace(0, 1, 9)
    return np.concatenate(
        [np.stack([x1 + (x2 - x1) * t, np.full(9, y)], 1) for y in (y1, y2)]
        + [np.stack([np.full(9, x), y1 + (y2 - y1) * t], 1) for x in (x1, x2)]
    )


def box_in_fisheye(box, w: int, h: int, yaw: float, lens_fov: float = 180.0, pitch: float = 0.0, ceiling=False):
    """Where a box of the perspective frame lands in the fisheye frame (normalised, around its outline)."""
    rays = _perspective_rays(_outline(box), w, h, yaw, pitch)
    if ceiling:
        rays = rays @ CEILING.T
    theta = np.arctan2(np.hypot(rays[:, 0], rays[:, 1]), rays[:, 2])
    phi = np.arctan2(rays[:, 1], rays[:, 0])
    r = 0.5 * theta / (math.radians(lens_fov) / 2)
    x, y = 0.5 + r * np.cos(phi), 0.5 + r * np.sin(phi)
    return (float(x.min()), float(y.min()), float(x.max()), float(y.max()))


def box_in_panorama(box, w: int, h: int, yaw: float):
    rays = _perspective_rays(_outline(box), w, h, yaw)
    lon = np.arctan2(rays[:, 0], rays[:, 2])
    lat = np.arctan2(-rays[:, 1], np.hypot(rays[:, 0], rays[:, 2]))
    x, y = 0.5 + lon / (2 * math.pi), 0.5 - lat / math.pi
    return (float(x.min()), float(y.min()), float(x.max()), float(y.max()))


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched(references: list, boxes: list, threshold: float = 0.3) -> list[int]:
    """For each reference box, how many of ``boxes`` match it (IoU ≥ threshold), boxes used once, best first."""
    counts = [0] * len(references)
    pairs = sorted(((iou(r, b), i, j) for i, r in enumerate(references) for j, b in enumerate(boxes)), reverse=True)
    used_r, used_b = set(), set()
    for value, i, j in pairs:
        if value < threshold or j in used_b:
            continue
        if i in used_r:
            continue
        used_r.add(i)
        used_b.add(j)
        counts[i] = 1
    return counts


def fisheye_recall(detector, frames, yaw: float, views: list[dict], size: int = 2400) -> dict[str, float]:
    """Recall of persons, through the vision pipeline (motion off), on the perspective frames, on the raw
    fisheye frames made from them, and on the fisheye's dewarped views. The people are what ``detector``
    finds at score ≥ 0.5 on each perspective frame, carried into the fisheye by the known projection."""
    from agent.config.vision import VisionConfig
    from agent.vision.pipeline import VisionPipeline
    from hw.camera import Frame

    def pipeline(projection):
        camera = {"source": "fisheye.avi", **({"projection": projection} if projection else {})}
        config = VisionConfig.model_validate({"camera": camera, "motion": {"enabled": False}})
        return VisionPipeline(config, detector)

    flat, dewarping = pipeline(None), pipeline({"type": "fisheye", "views": views})
    found = {"perspective": 0, "raw": 0, "dewarped": 0}
    total = 0
    for frame in frames:
        h, w = frame.rgb.shape[:2]
        people = [d.box for d in detector.detect(frame.rgb) if d.label == "person" and d.score >= 0.5]
        fisheye = Frame(rgb=fisheye_from_perspective(frame.rgb, size, yaw), timestamp=0.0, index=0)
        in_fisheye = [box_in_fisheye(b, w, h, yaw) for b in people]
        persons = lambda detections: [d.box for d in detections if d.label == "person"]  # noqa: E731
        found["perspective"] += sum(matched(people, persons(flat.look(frame))))
        found["raw"] += sum(matched(in_fisheye, persons(flat.look(fisheye))))
        found["dewarped"] += sum(matched(in_fisheye, persons(dewarping.look(fisheye))))
        total += len(people)
    return {key: round(value / max(total, 1), 3) for key, value in found.items()} | {"people": total}
