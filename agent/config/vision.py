"""Configuration of a camera box's vision pipeline: camera, detector, motion, zones, filters, rules, evidence.

Plain pydantic: reading it imports no numpy, OpenCV or interpreter.
Coordinates are normalised to the image (0..1, origin top-left); objects are
placed in zones by the bottom-centre of their box (where they stand).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from agent.config.base import Name, Section

Point = tuple[float, float]
_SCHEDULE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def _check_polygon(points: list[Point]) -> list[Point]:
    if len(points) < 3:
        raise ValueError(f"a polygon needs at least 3 points, got {len(points)}")
    for x, y in points:
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"point ({x}, {y}) is outside the image; coordinates are normalised to 0..1")
    return points


_URL_SOURCE = re.compile(r"^(rtsps?|https?)://[^/?#]+", re.IGNORECASE)


class ViewSection(Section):
    """One virtual perspective camera cut out of a 360° frame."""

    name: Name
    yaw: float = Field(
        0.0,
        ge=-360,
        le=360,
        description="Where the view looks, degrees to the right of the camera's forward direction "
        "(ceiling mount: clockwise from the top of the fisheye image; panorama: from its centre).",
    )
    pitch: float = Field(0.0, ge=-90, le=90, description="Degrees above the horizon; negative looks down.")
    fov: float = Field(80.0, ge=10, le=150, description="Horizontal field of view of the view, degrees.")
    width: int = Field(480, ge=64, le=2048, description="View width in pixels.")
    height: int = Field(360, ge=48, le=2048, description="View height in pixels.")


def _default_views(data: dict) -> list[dict]:
    """Overlapping views that cover what a 360° camera usually sees, when the config names none."""
    if data.get("type") == "equirectangular":
        return [{"name": f"yaw{yaw}", "yaw": yaw, "fov": 75.0} for yaw in range(0, 360, 60)]
    if data.get("mount", "wall") == "ceiling":
        return [{"name": f"yaw{yaw}", "yaw": yaw, "pitch": -40.0, "fov": 100.0} for yaw in (0, 90, 180, 270)]
    half = float(data.get("fov", 180.0)) / 2
    side = round(max(0.0, half - 40.0))
    yaws = [-side, 0, side] if side >= 20 else [0]
    return [{"name": f"yaw{yaw}", "yaw": yaw, "fov": 80.0} for yaw in yaws]


class ProjectionSection(Section):
    """How a 360° camera maps directions to pixels, and which perspective views the detector sees.

    ``fisheye`` is the equidistant model (distance from the image centre proportional to the angle
    from the optical axis), which most fisheye lenses follow closely; ``equirectangular`` is a
    stitched panorama (longitude across, latitude down, horizon in the middle).
    """

    type: Literal["fisheye", "equirectangular"]
    fov: float = Field(180.0, ge=90, le=280, description="Fisheye: field of view of the lens circle, degrees.")
    centre: Point = Field(
        (0.5, 0.5), description="Fisheye: centre of the lens circle, normalised to the frame (x of width, y of height)."
    )
    radius: float = Field(
        0.5,
        gt=0.05,
        le=2.0,
        description="Fisheye: radius of the lens circle (the edge of fov), fraction of frame height.",
    )
    mount: Literal["wall", "ceiling"] = Field(
        "wall", description="Fisheye: optical axis horizontal (wall) or pointing straight down (ceiling)."
    )
    views: list[ViewSection] = Field(
        default_factory=list,
        description="Perspective views the detector runs on; default: overlapping views covering the lens.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_views(cls, data):
        if isinstance(data, dict) and not data.get("views"):
            data = {**data, "views": _default_views(data)}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ProjectionSection:
        fisheye_only = {"fov", "centre", "radius", "mount"} & self.model_fields_set
        if self.type == "equirectangular" and fisheye_only:
            raise ValueError(f"{', '.join(sorted(fisheye_only))}: fisheye settings, not for an equirectangular camera")
        cx, cy = self.centre
        if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0):
            raise ValueError(f"centre ({cx}, {cy}) is outside the frame; it is normalised to 0..1")
        names = [v.name for v in self.views]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"view names must be unique; repeated: {', '.join(doubled)}")
        return self


class ThermalSection(Section):
    """A thermal camera's 16-bit frames (Y16 over UVC: PureThermal/Lepton and similar)."""

    radiometric: bool = Field(
        True, description="The 16-bit values are temperatures (Lepton TLinear: hundredths of a kelvin)."
    )
    kelvin_per_count: float = Field(0.01, gt=0, le=1, description="Radiometric: kelvin per 16-bit count.")
    offset_k: float = Field(0.0, ge=-1000, le=1000, description="Radiometric: kelvin at count 0.")
    normalise: Literal["fixed", "percentile"] = Field(
        "percentile",
        description="To 8 bits for the detector: a fixed range in °C (needs radiometric frames; the same "
        "temperature always gives the same grey), or a stretch between two percentiles of each frame.",
    )
    range_c: tuple[float, float] = Field((0.0, 40.0), description="normalise = fixed: °C shown black and white.")
    percentiles: tuple[float, float] = Field((1.0, 99.0), description="normalise = percentile: black and white.")
    body_c: tuple[float, float] | None = Field(
        (28.0, 40.0),
        description="Radiometric: a person candidate is kept only if enough of its box is in this band of "
        "apparent surface temperature (°C); unset to keep every person.",
    )
    body_fraction: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Share of a person box's pixels that must be in body_c (skin shows, clothes less).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ThermalSection:
        for name in ("range_c", "percentiles") + (("body_c",) if self.body_c else ()):
            low, high = getattr(self, name)
            if not low < high:
                raise ValueError(f"{name} must be [low, high] with low < high, got [{low}, {high}]")
        low, high = self.percentiles
        if low < 0 or high > 100:
            raise ValueError(f"percentiles must lie within 0..100, got [{low}, {high}]")
        if not self.radiometric:
            if self.normalise == "fixed":
                raise ValueError("normalise = 'fixed' needs radiometric frames; use 'percentile'")
            if "body_c" in self.model_fields_set and self.body_c is not None:
                raise ValueError("body_c needs radiometric frames (temperatures); unset it or set radiometric = true")
        return self

    @property
    def gates_persons(self) -> bool:
        return self.radiometric and self.body_c is not None


class CameraSection(Section):
    source: str = Field(
        description="'picamera2', a V4L2 index or /dev/videoN, an rtsp:// or http:// URL, or a file. "
        "Put a camera login in username/password_file, not in the URL (an inline password is hidden in logs)."
    )
    username: str | None = Field(None, min_length=1, description="Login of an RTSP/HTTP camera.")
    password_file: str | None = Field(
        None,
        description="File holding the camera's password; looked up like other secrets ($CREDENTIALS_DIRECTORY, "
        "credentials_dir, state_dir) and put into the URL only when the stream is opened.",
    )
    name: Name = Field("camera", description="Camera name used in events.")
    width: int = Field(640, ge=64, le=4096, description="Detection stream width (picamera2 lores / capture).")
    height: int = Field(480, ge=48, le=4096)
    fps: float = Field(10.0, gt=0, le=60, description="Requested frame rate.")
    realtime: bool = Field(False, description="Pace a video file at its own frame rate (replay as live).")
    rtsp_transport: Literal["tcp", "udp"] = Field("tcp", description="RTSP cameras: RTP over TCP or UDP.")
    loop: bool = Field(False, description="Restart a video file at its end.")
    reconnect_max_s: float = Field(30.0, ge=1, le=600, description="Cap of the reconnect backoff.")
    projection: ProjectionSection | None = Field(
        None, description="A 360° camera: its projection and the perspective views the detector runs on."
    )
    thermal: ThermalSection | None = Field(None, description="A thermal camera delivering 16-bit (Y16) frames.")

    # Field validators, not a model validator: an error then shows its own value, never a source with a password.
    @field_validator("username")
    @classmethod
    def _login_fits_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        source = info.data.get("source")
        if value is None or source is None:
            return value
        url = _URL_SOURCE.match(source)
        if url is None:
            raise ValueError("username and password_file are for rtsp:// and http(s):// camera sources only")
        if "@" in url.group(0):
            raise ValueError("the source URL carries a login already: give it in username/password_file only")
        return value

    @field_validator("thermal")
    @classmethod
    def _thermal_is_uvc(cls, value: ThermalSection | None, info: ValidationInfo) -> ThermalSection | None:
        source = info.data.get("source") or ""
        if value is not None and (source == "picamera2" or source.startswith("picamera2:")):
            raise ValueError("a thermal camera is a UVC (V4L2) device or a Y16 recording, not picamera2")
        return value

    @field_validator("password_file")
    @classmethod
    def _password_needs_user(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and "username" in info.data and info.data["username"] is None:  # absent: failed
            raise ValueError("password_file must be given with username")
        return value


class DetectorSection(Section):
    model: str = Field(
        "ssd-mobilenet-v1-coco-quant",
        description="Model name from models/manifest.toml, or the path of a .tflite file (family, input size and "
        "range read from the model itself; labels from <model>.txt beside it, else COCO).",
    )
    model_dir: str = Field("models", description="Directory holding model files, relative to state_dir.")
    runtime: Literal["auto", "litert", "tflite-runtime"] = "auto"
    num_threads: int | None = Field(
        None,
        ge=1,
        le=16,
        description="Interpreter threads; unset: one less than the CPU cores (at least 1), leaving a core for "
        "frame decoding and the agent.",
    )
    edgetpu: bool = Field(False, description="Use the Coral Edge TPU delegate (needs an _edgetpu model).")
    min_score: float = Field(0.4, ge=0.05, le=1.0, description="Detections below this are discarded.")
    track_labels: list[str] = Field(
        ["person", "backpack", "handbag", "suitcase"], description="Classes that are tracked and given to rules."
    )


class MotionSection(Section):
    enabled: bool = Field(True, description="Run inference only where there is motion or a tracked object.")
    threshold: int = Field(25, ge=1, le=255, description="Pixel difference counted as motion.")
    min_area: float = Field(0.0005, ge=0, le=1, description="Smallest motion blob, as a fraction of the frame.")
    full_frame_every_s: float = Field(5.0, ge=0.5, le=600, description="Periodic full-frame pass.")
    max_regions: int = Field(6, ge=1, le=16, description="Most zooms run on one frame besides the full frame.")
    zoom_budget: float = Field(
        0.03,
        ge=0,
        le=4,
        description="Busy scenes (more than one region) run the full frame plus zooms on small objects paid from "
        "this many extra model runs a frame on average: 0.03 keeps gating within ~1.1x the cost of not gating.",
    )


class FilterSection(Section):
    min_score: float = Field(0.4, ge=0, le=1, description="Per-detection minimum score.")
    median_score: float = Field(0.5, ge=0, le=1, description="Minimum median score over the track's history.")
    min_area: float = Field(0.0, ge=0, le=1, description="Minimum box area, fraction of the frame.")
    max_area: float = Field(1.0, gt=0, le=1, description="Maximum box area, fraction of the frame.")


class ZoneSection(Section):
    name: Name
    polygon: list[Point]
    view: Name | None = Field(
        None, description="360° cameras: the polygon is drawn on this view; unset: on the whole frame (panorama)."
    )
    inertia: int = Field(3, ge=1, le=100, description="Consecutive frames inside before an object counts as in.")
    filters: dict[str, FilterSection] = Field(
        default_factory=dict, description="Per-class filters that apply in this zone, on top of the camera's."
    )

    _polygon = field_validator("polygon")(lambda cls, v: _check_polygon(v))


class MaskSection(Section):
    polygon: list[Point]

    _polygon = field_validator("polygon")(lambda cls, v: _check_polygon(v))


class RuleSection(Section):
    name: Name
    type: Literal["intrusion", "grouping", "loitering", "unattended", "camera_tamper"]
    zone: Name | None = Field(None, description="Zone the rule watches; the whole image when unset.")
    classes: list[str] | None = Field(
        None, description="Object classes the rule is about (person; unattended: backpack, handbag, suitcase)."
    )
    schedule: list[str] = Field([], description="Intrusion: active only within these 'HH:MM-HH:MM' local times.")
    min_count: int = Field(3, ge=2, le=100, description="Grouping: persons needed.")
    max_distance: float | None = Field(
        None, gt=0, le=20, description="Grouping: persons within this many person-heights of each other."
    )
    min_duration_s: float = Field(0.0, ge=0, le=3600, description="Condition must hold this long to start.")
    hysteresis_s: float = Field(3.0, ge=0, le=600, description="Condition must be gone this long to end.")
    cooldown_s: float = Field(30.0, ge=0, le=86400, description="No new start this long after an end.")
    update_every_s: float = Field(10.0, ge=1, le=3600, description="Least time between 'update' events.")
    person_distance: float = Field(3.0, gt=0, le=50, description="Unattended: no person within this many object sizes.")
    evidence: bool = Field(False, description="Attach a redacted JPEG reference to the start alert.")

    @field_validator("schedule")
    @classmethod
    def _schedule_format(cls, value: list[str]) -> list[str]:
        for window in value:
            if not _SCHEDULE.match(window):
                raise ValueError(f"schedule window {window!r} must look like '22:00-06:00'")
        return value

    @property
    def watched_classes(self) -> list[str]:
        if self.classes is not None:
            return self.classes
        return ["backpack", "handbag", "suitcase"] if self.type == "unattended" else ["person"]

    @model_validator(mode="after")
    def _needs_duration(self) -> RuleSection:
        if self.type in ("loitering", "unattended") and self.min_duration_s == 0:
            raise ValueError(f"a {self.type} rule needs min_duration_s (how long counts as {self.type})")
        return self


class EvidenceSection(Section):
    dir: str = Field("evidence", description="Where redacted JPEGs are kept, relative to state_dir.")
    retention_s: float = Field(86400.0, ge=60, le=30 * 86400, description="Deleted after this long.")
    jpeg_quality: int = Field(80, ge=30, le=95)
    head_fraction: float = Field(
        0.35, ge=0.1, le=1.0, description="Upper part of each person box that is covered (a mosaic scaled to it)."
    )
    face_model: str = Field(
        "blazeface-full-range",
        description="Face model (models/manifest.toml) that finds the faces to cover in every picture, "
        "in the detector's model_dir; without it no picture is written or sent.",
    )
    min_face_px: float = Field(
        16, ge=6, le=200, description="Smallest face, in pixels of the full-size frame, looked for in pictures."
    )
    face_min_score: float = Field(0.4, ge=0.05, le=0.95, description="Face model score above which a face is covered.")


class VisionSection(Section):
    startup_timeout_s: float = Field(
        60.0,
        ge=1,
        le=900,
        description="The vision process must report its first heartbeat (imports, model load and check done) "
        "within this long after it is started, or it is restarted.",
    )
    stall_s: float = Field(
        5.0, ge=1, le=120, description="After its first heartbeat, a pipeline silent this long is restarted."
    )
    restart_max_s: float = Field(60.0, ge=1, le=3600, description="Cap of the restart backoff.")
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much nicer (lower priority) than the agent the vision process runs; a failure to lower "
        "it is reported as a 'priority' fault and in the vision telemetry.",
    )


class VisionSettings(Section):
    """The vision sections a device config may carry (all but the camera have defaults)."""

    detector: DetectorSection = Field(default_factory=DetectorSection)
    motion: MotionSection = Field(default_factory=MotionSection)
    filters: dict[str, FilterSection] = Field(default_factory=dict)
    zones: list[ZoneSection] = Field(default_factory=list)
    privacy_masks: list[MaskSection] = Field(default_factory=list)
    ignore_areas: list[MaskSection] = Field(
        default_factory=list,
        description="Areas that never count as motion and where detected objects are dropped (a road, a TV screen, "
        "trees in the wind); unlike privacy masks they are not blacked out in pictures.",
    )
    rules: list[RuleSection] = Field(default_factory=list)
    evidence: EvidenceSection = Field(default_factory=EvidenceSection)
    vision: VisionSection = Field(default_factory=VisionSection)


class VisionConfig(VisionSettings):
    """Everything the vision process needs; passed to it as JSON."""

    camera: CameraSection

    @model_validator(mode="after")
    def _zone_views(self) -> VisionConfig:
        projection = self.camera.projection
        views = {v.name for v in projection.views} if projection else set()
        for zone in self.zones:
            if zone.view is None or zone.view in views:
                continue
            if projection is None:
                raise ValueError(f"zone {zone.name!r} is drawn on view {zone.view!r}, but the camera has no projection")
            raise ValueError(
                f"zone {zone.name!r} is drawn on view {zone.view!r}, which is not defined; views: {', '.join(sorted(views))}"
            )
        return self

    @model_validator(mode="after")
    def _references(self) -> VisionConfig:
        zones = {z.name for z in self.zones}
        for rule in self.rules:
            if rule.zone is not None and rule.zone not in zones:
                raise ValueError(
                    f"rule {rule.name!r} refers to zone {rule.zone!r}, which is not defined; "
                    f"zones: {', '.join(sorted(zones)) or 'none'}"
                )
        names = [r.name for r in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique")
        return self
