"""Where the devices are, drawn without any map service: a plain projection of lat/lon, and site plans.

Positions come from enrolment (``provision --lat/--lon`` or a site plan with x/y). WGS84 positions are
drawn on a plain equirectangular projection fitted to the fleet (fine over a city); devices on a site
plan are drawn on that plan, over its image when ``[console] plans_dir`` holds ``<plan>.png`` (x/y in
the image's pixels), else fitted like the lat/lon ones. Works on a closed network: nothing is fetched.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.console.fleet import FleetRow
from agent.protocol.enrolment import EnrolledDevice

#: The drawing's size (SVG user units); points keep this margin from the edges.
WIDTH, HEIGHT, MARGIN = 1000.0, 600.0, 120.0


@dataclass(frozen=True)
class MapPoint:
    device: str
    site: str
    state: str
    location: str
    x: float  # in the drawing's units
    y: float


@dataclass(frozen=True)
class MapLayer:
    title: str
    points: list[MapPoint]
    image: str | None = None  # URL of the plan's image, when there is one
    width: float = WIDTH
    height: float = HEIGHT
    tiles: list[tuple[str, float, float]] = field(default_factory=list)  # (URL, x, y) of each 256 px tile


def map_layers(
    rows: Iterable[FleetRow],
    devices: dict[str, EnrolledDevice],
    plans_dir: Path | None,
    tiles_url: str | None = None,
) -> list[MapLayer]:
    """One layer for lat/lon positions (over the city's tiles when ``tiles_url`` is set), one per site plan."""
    geo: list[tuple[FleetRow, float, float]] = []
    latlon: list[tuple[FleetRow, float, float]] = []
    plans: dict[str, list[tuple[FleetRow, float, float]]] = {}
    for row in rows:
        position = devices[row.device].position if row.device in devices else None
        if position is None:
            continue
        if position.lat is not None and position.lon is not None:
            geo.append((row, position.lon * math.cos(math.radians(position.lat)), -position.lat))
            latlon.append((row, position.lat, position.lon))
        if position.plan is not None and position.x is not None and position.y is not None:
            plans.setdefault(position.plan, []).append((row, position.x, position.y))
    if not geo:
        layers = []
    elif tiles_url:
        layers = [tiled_layer(latlon, tiles_url)]
    else:
        layers = [MapLayer("Map (plain projection of lat/lon)", _fitted(geo))]
    for plan, placed in sorted(plans.items()):
        size = _png_size(plans_dir / f"{plan}.png") if plans_dir is not None else None
        if size is None:
            layers.append(MapLayer(f"Site plan {plan}", _fitted(placed)))
        else:
            points = [_point(row, x, y) for row, x, y in placed]
            layers.append(MapLayer(f"Site plan {plan}", points, f"/plans/{plan}.png", *size))
    return layers


def _fitted(placed: list[tuple[FleetRow, float, float]]) -> list[MapPoint]:
    """Scale the same on both axes (no distortion) to fill the drawing, centred."""
    xs, ys = [x for _, x, _ in placed], [y for _, _, y in placed]
    span = max(max(xs) - min(xs), (max(ys) - min(ys)) * WIDTH / HEIGHT, 1e-9)
    scale = (WIDTH - 2 * MARGIN) / span
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return [_point(row, WIDTH / 2 + (x - cx) * scale, HEIGHT / 2 + (y - cy) * scale) for row, x, y in placed]


TILE = 256
MAX_ZOOM = 19


def mercator(lat: float, lon: float, zoom: int) -> tuple[float, float]:
    """Web Mercator pixel coordinates at ``zoom`` (what every tile server cuts its tiles by)."""
    size = TILE * 2**zoom
    sin = min(max(math.sin(math.radians(lat)), -0.9999), 0.9999)
    return (lon + 180.0) / 360.0 * size, (0.5 - math.log((1 + sin) / (1 - sin)) / (4 * math.pi)) * size


def tiled_layer(placed: list[tuple[FleetRow, float, float]], url: str) -> MapLayer:
    """The devices over the city's tile server: the closest zoom that shows them all, the tiles that cover it."""
    zoom = 0
    for candidate in range(MAX_ZOOM, -1, -1):
        xs, ys = zip(*(mercator(lat, lon, candidate) for _, lat, lon in placed), strict=True)
        if max(xs) - min(xs) <= WIDTH - 2 * MARGIN and max(ys) - min(ys) <= HEIGHT - 2 * MARGIN:
            zoom = candidate
            break
    pixels = [(row, *mercator(lat, lon, zoom)) for row, lat, lon in placed]
    left = (max(p[1] for p in pixels) + min(p[1] for p in pixels)) / 2 - WIDTH / 2
    top = (max(p[2] for p in pixels) + min(p[2] for p in pixels)) / 2 - HEIGHT / 2
    last = 2**zoom - 1
    tiles = [
        (url.format(z=zoom, x=x, y=y), x * TILE - left, y * TILE - top)
        for x in range(max(0, int(left // TILE)), min(last, int((left + WIDTH) // TILE)) + 1)
        for y in range(max(0, int(top // TILE)), min(last, int((top + HEIGHT) // TILE)) + 1)
    ]
    points = [_point(row, x - left, y - top) for row, x, y in pixels]
    return MapLayer(f"Map (zoom {zoom})", points, tiles=tiles)


def _point(row: FleetRow, x: float, y: float) -> MapPoint:
    return MapPoint(row.device, row.site, row.state, row.location, round(x, 1), round(y, 1))


def _png_size(path: Path) -> tuple[float, float] | None:
    """A PNG's width and height from its header, or None if there is no readable PNG there."""
    try:
        with path.open("rb") as handle:
            header = handle.read(24)
    except OSError:
        return None
    if len(header) < 24 or header[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    width, height = struct.unpack(">II", header[16:24])
    return (float(width), float(height)) if width and height else None
