"""360° cameras: perspective views cut out of a fisheye or equirectangular frame, and boxes mapped back.

A detector trained on ordinary photographs loses the people a fisheye squeezes
and bends at its edges; on an undistorted perspective view it sees them as it
was trained to. Each view is a virtual pinhole camera (``yaw``, ``pitch``,
``fov``, size) whose pixels are looked up in the source frame with ``cv2.remap``;
the lookup maps are computed once per source size. Detections come back as
boxes in the source frame's normalised coordinates (the fisheye image or the
panorama), so tracking, rules and zones work in one coordinate system; the same
person seen by two overlapping views becomes one box before tracking.

Directions: world x right, y down, z forward. A wall-mounted fisheye looks
along z; a ceiling-mounted one looks down (+y), with the top of its image
towards yaw 0. A panorama's centre column is yaw 0, its middle row the horizon.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from agent.config.vision import Point, ProjectionSection, ViewSection, ZoneSection
from agent.vision.decoders import Detection

Box = tuple[float, float, float, float]

#: Source directions for a ceiling mount: optical axis = world down, image up = world forward.
_CEILING = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
#: Cells per side of the coarse grid that records which part of the source each view sees.
FOOTPRINT_CELLS = 48
#: Points per box side mapped back to the source (a straight edge in a view is a curve there).
EDGE_POINTS = 9


def view_rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """View directions → world directions: pitch (up positive) about x, then yaw (right positive) about y."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    turn = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    return turn @ tilt


class Projection:
    """The geometry of one 360° camera and its views; ``aspect`` is the source frame's width / height."""

    def __init__(self, settings: ProjectionSection):
        self.settings = settings
        self.views: list[ViewSection] = list(settings.views)
        self._index = {v.name: i for i, v in enumerate(self.views)}
        self._maps: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._footprints: dict[float, np.ndarray] = {}
        self._zones_aspect: float | None = None
        self._axes: np.ndarray | None = None
        self._half_fovs: np.ndarray | None = None

    def view_index(self, name: str) -> int:
        return self._index[name]

    # -- geometry -------------------------------------------------------------------------------------

    def rays_to_source(self, rays: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
        """World directions (N×3) → normalised source points (N×2) and whether the lens sees them."""
        s = self.settings
        if s.type == "equirectangular":
            x, y, z = rays[:, 0], rays[:, 1], rays[:, 2]
            lon = np.arctan2(x, z)
            lat = np.arctan2(-y, np.hypot(x, z))
            points = np.stack([0.5 + lon / (2 * math.pi), 0.5 - lat / math.pi], axis=1)
            return points, np.ones(len(rays), dtype=bool)
        cam = rays @ _CEILING.T if s.mount == "ceiling" else rays
        x, y, z = cam[:, 0], cam[:, 1], cam[:, 2]
        rho = np.hypot(x, y)
        theta = np.arctan2(rho, z)  # angle from the optical axis
        half = math.radians(s.fov) / 2
        r = s.radius * theta / half  # equidistant, in frame heights
        scale = np.divide(r, rho, out=np.zeros_like(r), where=rho > 1e-12)
        px = s.centre[0] * aspect + x * scale
        py = s.centre[1] + y * scale
        return np.stack([px / aspect, py], axis=1), theta <= half + 1e-9

    def view_rays(self, view: ViewSection, points: np.ndarray) -> np.ndarray:
        """Normalised view points (N×2) → world directions (N×3)."""
        focal = 0.5 / math.tan(math.radians(view.fov) / 2)  # in view widths
        x = points[:, 0] - 0.5
        y = (points[:, 1] - 0.5) * view.height / view.width
        rays = np.stack([x, y, np.full_like(x, focal)], axis=1)
        return rays @ view_rotation(view.yaw, view.pitch).T

    def view_to_source(self, index: int, points: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
        return self.rays_to_source(self.view_rays(self.views[index], points), aspect)

    # -- pixels ---------------------------------------------------------------------------------------

    def maps(self, index: int, source_w: int, source_h: int) -> tuple[np.ndarray, np.ndarray]:
        """``cv2.remap`` maps of one view for one source size; computed on first use, then kept."""
        key = (index, source_w, source_h)
        if key not in self._maps:
            view = self.views[index]
            u, v = np.meshgrid((np.arange(view.width) + 0.5) / view.width, (np.arange(view.height) + 0.5) / view.height)
            source, seen = self.view_to_source(index, np.stack([u.ravel(), v.ravel()], axis=1), source_w / source_h)
            map_x = (source[:, 0] * source_w - 0.5).astype(np.float32)
            map_y = (source[:, 1] * source_h - 0.5).astype(np.float32)
            if self.settings.type == "equirectangular":
                map_x = np.mod(map_x, source_w).astype(np.float32)  # the panorama wraps around at yaw 180
            map_x[~seen] = map_y[~seen] = -1.0  # outside the lens circle: black
            shape = (view.height, view.width)
            self._maps[key] = cv2.convertMaps(map_x.reshape(shape), map_y.reshape(shape), cv2.CV_16SC2)
        return self._maps[key]

    def dewarp(self, image: np.ndarray, index: int) -> np.ndarray:
        h, w = image.shape[:2]
        map1, map2 = self.maps(index, w, h)
        return cv2.remap(image, map1, map2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

    # -- boxes, zones, footprints ---------------------------------------------------------------------

    def box_to_source(self, index: int, box: Box, aspect: float) -> Box | None:
        """A box in a view → the box around its outline in the source (None if the lens sees none of it)."""
        x1, y1, x2, y2 = box
        t = np.linspace(0.0, 1.0, EDGE_POINTS)
        xs, ys = x1 + (x2 - x1) * t, y1 + (y2 - y1) * t
        outline = np.concatenate(
            [
                np.stack([xs, np.full_like(xs, y1)], 1),
                np.stack([xs, np.full_like(xs, y2)], 1),
                np.stack([np.full_like(ys, x1), ys], 1),
                np.stack([np.full_like(ys, x2), ys], 1),
            ]
        )
        points, seen = self.view_to_source(index, outline, aspect)
        points = points[seen]
        if not len(points):
            return None
        if self.settings.type == "equirectangular" and np.ptp(points[:, 0]) > 0.5:
            # Across the panorama's seam: keep the side that holds the box's centre.
            centre, _ = self.view_to_source(index, np.array([[(x1 + x2) / 2, (y1 + y2) / 2]]), aspect)
            points = points[(points[:, 0] >= 0.5) == (centre[0, 0] >= 0.5)]
        low, high = np.clip(points.min(axis=0), 0, 1), np.clip(points.max(axis=0), 0, 1)
        if high[0] <= low[0] or high[1] <= low[1]:
            return None
        return (float(low[0]), float(low[1]), float(high[0]), float(high[1]))

    def polygon_to_source(self, index: int, polygon: list[Point], aspect: float, per_edge: int = 12) -> list[Point]:
        """A polygon drawn on a view → the same outline in source coordinates (edges densified)."""
        corners = np.array(polygon + polygon[:1], dtype=np.float64)
        t = np.linspace(0.0, 1.0, per_edge, endpoint=False)[:, None]
        dense = np.concatenate([a + (b - a) * t for a, b in zip(corners[:-1], corners[1:], strict=True)])
        points, seen = self.view_to_source(index, dense, aspect)
        points = np.clip(points[seen], 0.0, 1.0)
        return [(float(x), float(y)) for x, y in points]

    def outline(self, index: int, aspect: float) -> list[Point]:
        """The view's border in the source: what an installer sees drawn on the fisheye or panorama."""
        return self.polygon_to_source(index, [(0, 0), (1, 0), (1, 1), (0, 1)], aspect, per_edge=24)

    def zones_in_source(self, zones: list[ZoneSection], aspect: float) -> list[ZoneSection]:
        """Zones drawn on a view, redrawn on the source frame where tracks and rules live."""
        return [
            zone
            if zone.view is None
            else zone.model_copy(
                update={"polygon": self.polygon_to_source(self.view_index(zone.view), zone.polygon, aspect)}
            )
            for zone in zones
        ]

    def place_zones(self, placed: dict, zones: list[ZoneSection], shape: tuple[int, ...]) -> None:
        """Give the rule engine's zones (``name → Zone``) their source polygons for this frame size, once."""
        aspect = shape[1] / shape[0]
        if self._zones_aspect == aspect:
            return
        for zone in self.zones_in_source(zones, aspect):
            placed[zone.name].polygon = zone.polygon
        self._zones_aspect = aspect

    def footprint(self, index: int, aspect: float) -> np.ndarray:
        """Which cells of a coarse grid over the source this view sees (for choosing views to run)."""
        if aspect not in self._footprints:
            grids = []
            n = 64
            u, v = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n)
            for i in range(len(self.views)):
                points, seen = self.view_to_source(i, np.stack([u.ravel(), v.ravel()], 1), aspect)
                cells = np.clip((points[seen] * FOOTPRINT_CELLS).astype(int), 0, FOOTPRINT_CELLS - 1)
                grid = np.zeros((FOOTPRINT_CELLS, FOOTPRINT_CELLS), dtype=bool)
                grid[cells[:, 1], cells[:, 0]] = True
                grids.append(cv2.dilate(grid.astype(np.uint8), None).astype(bool))
            self._footprints[aspect] = np.stack(grids)
        return self._footprints[aspect][index]

    def views_seeing(self, boxes: list[Box], aspect: float) -> list[int]:
        """Views whose footprint meets any of these source boxes (motion, tracks)."""
        chosen = []
        for index in range(len(self.views)):
            grid = self.footprint(index, aspect)
            for x1, y1, x2, y2 in boxes:
                c1, r1 = int(x1 * FOOTPRINT_CELLS), int(y1 * FOOTPRINT_CELLS)
                c2, r2 = int(math.ceil(x2 * FOOTPRINT_CELLS)), int(math.ceil(y2 * FOOTPRINT_CELLS))
                if grid[r1 : max(r2, r1 + 1), c1 : max(c2, c1 + 1)].any():
                    chosen.append(index)
                    break
        return chosen

    # -- detection ------------------------------------------------------------------------------------

    def detect(self, image: np.ndarray, detector, indexes: list[int] | None = None) -> list[Detection]:
        """Run ``detector`` on the chosen views of ``image`` (all by default); boxes in source coordinates."""
        h, w = image.shape[:2]
        found = []
        for index in range(len(self.views)) if indexes is None else indexes:
            for d in detector.detect(self.dewarp(image, index)):
                box = self.box_to_source(index, d.box, w / h)
                if box is not None:
                    owned = self.owner(index, d.box) == index
                    found.append((index, Detection(d.label, d.class_id, d.score, box), owned))
        return merge_across_views(found)

    def owner(self, index: int, box: Box) -> int:
        """The view that sees this box's centre most centrally (angle off its axis over its half field of view):
        of the views that see an object, the one that sees it whole and least distorted."""
        if self._axes is None:
            self._axes = np.stack([view_rotation(v.yaw, v.pitch)[:, 2] for v in self.views])
            self._half_fovs = np.radians([v.fov / 2 for v in self.views])
        centre = np.array([[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]])
        ray = self.view_rays(self.views[index], centre)[0]
        off_axis = np.arccos(np.clip(self._axes @ (ray / np.linalg.norm(ray)), -1.0, 1.0))
        return int(np.argmin(off_axis / self._half_fovs))


def _overlap(a: Box, b: Box) -> tuple[float, float]:
    """IoU and intersection over the smaller box."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    union = area_a + area_b - inter
    return (inter / union if union > 0 else 0.0), (inter / min(area_a, area_b) if min(area_a, area_b) > 0 else 0.0)


def merge_across_views(
    found: list[tuple[int, Detection, bool]], iou: float = 0.3, contained: float = 0.6
) -> list[Detection]:
    """One box per object from ``(view, detection, owned)`` triples, ``owned`` when the detecting view is the one
    that sees the box's centre most centrally (``Projection.owner``).

    Each object is reported by the view it is most central in, where it is whole and least bent: owned
    boxes are kept (one of two owned boxes of one class from different views that overlap by IoU ≥ 0.5,
    the rare case of a centre right on the border, is dropped). A box seen by a view that does not own it is
    kept only if it overlaps no kept box (IoU ≥ ``iou`` or mostly inside one, ``contained``): the owning view
    missed it. Boxes of one view are left as the detector's own NMS gave them (two people side by side stay
    two). Run before tracking, so a seam never makes two tracks.
    """
    kept: list[tuple[int, Detection]] = []
    for view, d, owned in sorted(found, key=lambda item: (not item[2], -item[1].score)):  # owned boxes first
        same_object = False
        for other_view, k in kept:
            if k.label != d.label or other_view == view:
                continue
            over, inside = _overlap(k.box, d.box)
            if over >= 0.5 or (not owned and (over >= iou or inside >= contained)):
                same_object = True
                break
        if not same_object:
            kept.append((view, d))
    return [d for _, d in kept]


VIEW_COLOUR = (255, 0, 255)


def views_picture(annotated: np.ndarray, projection: Projection, strip_height: int = 240) -> np.ndarray:
    """The annotated source frame with each view's outline and name, above a strip of the views themselves.

    The views are cut from the annotated (already redacted) picture, so they show the same boxes,
    zones and redaction as the source, as the detector saw them.
    """
    h, w = annotated.shape[:2]
    tiles = []
    for index, view in enumerate(projection.views):
        tile = projection.dewarp(annotated, index)
        tile = cv2.resize(tile, (max(1, round(view.width * strip_height / view.height)), strip_height))
        cv2.putText(tile, view.name, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, VIEW_COLOUR, 1, cv2.LINE_AA)
        tiles.append(cv2.copyMakeBorder(tile, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=VIEW_COLOUR))
    source = annotated.copy()
    for index, view in enumerate(projection.views):
        outline = np.array([[round(x * w), round(y * h)] for x, y in projection.outline(index, w / h)], np.int32)
        if len(outline) > 2:
            cv2.polylines(source, [outline], isClosed=True, color=VIEW_COLOUR, thickness=2)
            label = tuple(int(v) for v in outline.mean(axis=0))
            cv2.putText(source, view.name, label, cv2.FONT_HERSHEY_SIMPLEX, 0.6, VIEW_COLOUR, 2, cv2.LINE_AA)
    strip = np.concatenate(tiles, axis=1)
    width = max(w, strip.shape[1])
    padded = [cv2.copyMakeBorder(i, 0, 0, 0, width - i.shape[1], cv2.BORDER_CONSTANT, value=0) for i in (source, strip)]
    return np.concatenate(padded, axis=0)
