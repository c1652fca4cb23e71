"""Frames in, signed-alert bodies out: motion gating → detection on regions → tracking → rules.

Runs inside the vision process (see ``worker``); knows nothing of MQTT or
the outbox. Every message it returns carries metadata only; an evidence
reference is added only for rules that ask for it.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import cv2

from agent.config.vision import VisionConfig
from agent.errors import RedactionUnavailable
from agent.vision.camera_tamper import CameraTamperDetector
from agent.vision.detector import Detection, Detector
from agent.vision.evidence import EvidenceStore
from agent.vision.motion import MotionDetector, Region, RegionPlanner
from agent.vision.rules import RuleEngine, RuleEvent, passes, point_in_polygon
from agent.vision.snapshot import SnapshotRequests
from agent.vision.tracking import ObjectTracker, Track
from hw.camera import Frame
from hw.frame_prefetch import put_unless_stopped

TAMPER_CHECK_EVERY_S = 0.25
PreparedRegion = tuple[Region, Any, tuple[float, float, float, float]]  # region, tensor, mapping


def merge_detections(detections: list[Detection], iou: float = 0.5) -> list[Detection]:
    """Class-aware NMS across overlapping regions."""
    if len(detections) < 2:
        return detections
    boxes = [[d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]] for d in detections]
    keep = cv2.dnn.NMSBoxesBatched(boxes, [d.score for d in detections], [d.class_id for d in detections], 0.0, iou)
    return [detections[i] for i in sorted(int(i) for i in keep)]


class VisionPipeline:
    def __init__(self, config: VisionConfig, detector: Detector, evidence: EvidenceStore | None = None):
        self.config = config
        self.detector = detector
        self.evidence = evidence
        self.snapshots = SnapshotRequests(evidence.directory) if evidence is not None else None
        self.excluded = [m.polygon for m in config.privacy_masks] + [a.polygon for a in config.ignore_areas]
        self.motion = (
            MotionDetector(config.motion.threshold, config.motion.min_area, excluded=self.excluded)
            if config.motion.enabled
            else None
        )
        self.planner = RegionPlanner(
            max(detector.width, detector.height), config.motion.max_regions, config.motion.zoom_budget
        )
        self.tracker = ObjectTracker()
        self.rules = RuleEngine(config.zones, config.rules)
        self.tamper_rules = [self.rules.situations[r.name] for r in config.rules if r.type == "camera_tamper"]
        self.tamper = CameraTamperDetector() if self.tamper_rules else None
        self.track_labels = set(config.detector.track_labels)
        self.projection, self.thermal = camera_models(config)
        self.tracks: list[Track] = []
        self.people_seen: list[Detection] = []
        self.evidence_withheld = 0
        self._last_full = float("-inf")
        self._last_tamper_check = float("-inf")
        self.frames = 0
        self.frames_skipped = 0
        self.inference_ms_avg = 0.0
        self._fps_window: list[float] = []

    def stats(self) -> dict[str, Any]:
        window = self._fps_window
        fps = (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 and window[-1] > window[0] else 0.0
        return {
            "camera": self.config.camera.name,
            "camera_fps": round(fps, 2),
            "frames": self.frames,
            "frames_skipped_by_motion": self.frames_skipped,
            "inference_ms_avg": round(self.inference_ms_avg, 2),
            "runtime": self.detector.runtime,
            "model": self.detector.spec.name,
            "tracked_objects": len(self.tracks),
            "evidence_withheld": self.evidence_withheld,
            "model_runs_per_frame": round(self.planner.runs / self.planner.frames, 3) if self.planner.frames else 0.0,
        }

    def process(self, frame: Frame) -> list[dict[str, Any]]:
        """One frame; returns ``{"kind", "body"}`` messages for the agent to sign and send."""
        return self.judge(frame, self.look(frame))

    def look(self, frame: Frame) -> list[Detection] | None:
        """First stage: motion gating and detection (None when the frame is skipped).

        Safe to run on another thread while ``judge`` handles the previous frame:
        it only reads ``self.tracks``, which ``judge`` replaces whole.
        """
        return self.infer(frame, self.prepare(frame))

    def prepare(self, frame: Frame) -> list[PreparedRegion] | ViewPlan | None:
        """First half of ``look``: motion, the region plan, each region cut, resized and quantised
        (for a 360° camera: which of its views to look through).

        No interpreter here, so it can run ahead on another core while the previous frame is inferred.
        """
        if self.thermal is not None:
            self.thermal.prepare(frame)
        if self.projection is not None:
            return self._plan_views(frame)
        regions = self._regions(frame, frame.timestamp)
        return [(region, *self.detector.prepare(self._crop(frame, region))) for region in regions] or None

    def infer(self, frame: Frame, prepared: list[PreparedRegion] | ViewPlan | None) -> list[Detection] | None:
        """Second half of ``look``: the model on each prepared region, boxes back in frame coordinates."""
        if prepared is None:
            return None
        if isinstance(prepared, ViewPlan):
            found = self.projection.detect(frame.full, self.detector, prepared.views)
            self.inference_ms_avg = 0.9 * self.inference_ms_avg + 0.1 * self.detector.last_invoke_ms
            return self._keep(frame, found)
        h, w = frame.rgb.shape[:2]
        found: list[Detection] = []
        for (x, y, rw, rh), tensor, mapping in prepared:
            for d in self.detector.infer(tensor, mapping):
                box = (
                    (x + d.box[0] * rw) / w,
                    (y + d.box[1] * rh) / h,
                    (x + d.box[2] * rw) / w,
                    (y + d.box[3] * rh) / h,
                )
                found.append(Detection(d.label, d.class_id, d.score, box))
            self.inference_ms_avg = (
                0.9 * self.inference_ms_avg + 0.1 * self.detector.last_invoke_ms
                if self.inference_ms_avg
                else self.detector.last_invoke_ms
            )
        return self._keep(frame, found)

    def _keep(self, frame: Frame, found: list[Detection]) -> list[Detection]:
        """Thermal gate, boxes merged; every person noted for redaction, then the class filters and areas."""
        if self.thermal is not None:
            found = self.thermal.gate(found, frame.raw)
        merged = merge_detections(found)
        self.people_seen = [d for d in merged if d.label == "person"]  # for redaction: whatever the filters say
        return [d for d in merged if d.label in self.track_labels and self._detection_ok(d)]

    def _plan_views(self, frame: Frame) -> ViewPlan | None:
        """360° cameras: the perspective views that see motion or a track (all of them on the periodic pass)."""
        h, w = frame.rgb.shape[:2]
        if self.motion is None:
            return ViewPlan(None)
        if frame.timestamp - self._last_full >= self.config.motion.full_frame_every_s:
            self._last_full = frame.timestamp
            self.motion.detect(frame.rgb)  # keeps the motion background current
            return ViewPlan(None)
        interest = self.motion.detect(frame.rgb)
        if not interest:
            return None
        return ViewPlan(self.projection.views_seeing(interest + [t.box for t in self.tracks], w / h))

    def judge(self, frame: Frame, detections: list[Detection] | None) -> list[dict[str, Any]]:
        """Second stage: camera tamper, tracking and rules."""
        now = frame.timestamp
        self.frames += 1
        self._fps_window = (self._fps_window + [now])[-30:]
        messages = []
        if self.tamper is not None and now - self._last_tamper_check >= TAMPER_CHECK_EVERY_S:
            self._last_tamper_check = now  # tampering is judged over seconds; 4 looks a second are plenty
            messages += self._judge_tamper(frame, now)
        if self.projection is not None:  # zones drawn on a view, redrawn on the source frame
            self.projection.place_zones(self.rules.zones, self.config.zones, frame.rgb.shape)
        if detections is None:
            self.frames_skipped += 1
        else:
            self.tracks = self.tracker.update(detections, now)
        confirmed = [t for t in self.tracks if passes(t, self.config.filters)]
        for event in self.rules.evaluate(confirmed, now):
            messages.append(self._message(event, frame))
        if self.snapshots is not None:
            self._snapshot_if_asked(frame)
        return messages

    def _snapshot_if_asked(self, frame: Frame) -> None:
        """The centre's snapshot command: this frame, redacted and stored exactly as evidence (see snapshot)."""
        snapshot_id = self.snapshots.pending()
        if snapshot_id is None:
            return
        try:
            self.evidence.save(frame.full, self.tracks + self.people_seen, str(snapshot_id))
        except Exception as exc:  # noqa: BLE001 - redaction unavailable, a full disk: the centre hears why
            self.snapshots.refuse(snapshot_id, f"{type(exc).__name__}: {exc}")

    def _judge_tamper(self, frame: Frame, now: float) -> list[dict[str, Any]]:
        """Tamper situations step with each look; a lighting change is one plain event, never a tamper alert."""
        look = self.tamper.check(frame.rgb)
        messages = []
        for situation in self.tamper_rules:
            event = situation.step(look.reason is not None, {"reason": look.reason or "", **look.metrics}, now)
            if event is not None:
                messages.append(self._message(event, frame))
        if look.lights_changed is not None:
            details = {"lights": look.lights_changed, **look.metrics}
            notice = RuleEvent(
                self.tamper_rules[0].rule.name, "lights_changed", "notice", str(uuid.uuid4()), now, details
            )
            messages.append(self._message(notice, frame))
        return messages

    def _regions(self, frame: Frame, now: float) -> list[Region]:
        """Where to run the model: nowhere on a still scene; around motion and every track when something moves;
        the full frame on the periodic pass, so stationary objects stay tracked. The planner bounds the cost."""
        h, w = frame.rgb.shape[:2]
        if self.motion is None:
            return [(0, 0, w, h)]
        moved = self.motion.detect(frame.rgb)
        tracked = [t.box for t in self.tracks]
        full_pass = now - self._last_full >= self.config.motion.full_frame_every_s
        if full_pass:
            self._last_full = now
        return self.planner.plan(moved + tracked if moved or full_pass else [], w, h, full_pass=full_pass)

    def _detect(self, frame: Frame, regions: list[Region]) -> list[Detection]:
        """The model on these regions of the frame."""
        prepared = [(region, *self.detector.prepare(self._crop(frame, region))) for region in regions]
        return self.infer(frame, prepared) or []

    @staticmethod
    def _crop(frame: Frame, region: Region):
        """Regions are planned on the small detection frame but cut from the full-size one (picamera2's
        main stream), so a small, distant person is seen with all the pixels the sensor has."""
        x, y, rw, rh = region
        h, w = frame.rgb.shape[:2]
        sy, sx = frame.full.shape[0] / h, frame.full.shape[1] / w
        return frame.full[round(y * sy) : round((y + rh) * sy), round(x * sx) : round((x + rw) * sx)]

    def _detection_ok(self, detection: Detection) -> bool:
        """Class filters, and nothing standing in a privacy mask or an ignore area."""
        x1, _, x2, y2 = detection.box
        if any(point_in_polygon(((x1 + x2) / 2, y2), polygon) for polygon in self.excluded):
            return False
        rule = self.config.filters.get(detection.label)
        if rule is None:
            return True
        return detection.score >= rule.min_score and rule.min_area <= detection.area <= rule.max_area

    def _message(self, event: RuleEvent, frame: Frame) -> dict[str, Any]:
        body = {
            "source": "camera",
            "camera": self.config.camera.name,
            "rule": event.rule,
            "rule_type": event.rule_type,
            "phase": event.phase,
            "situation_id": event.event_id,
            "model": self.detector.spec.name,
            "at_wall": time.time(),
            **event.details,
        }
        rule = self.rules.situations[event.rule].rule
        if event.phase == "start" and rule.evidence and self.evidence is not None:
            try:  # every person box, tracked or not, confirmed or not, has its head covered
                body["evidence"] = self.evidence.save(frame.full, self.tracks + self.people_seen, event.event_id)
            except RedactionUnavailable as exc:
                body["evidence_withheld"] = str(exc)
                self.evidence_withheld += 1
        return {"kind": "alert" if event.phase == "start" else "event", "body": body}


@dataclass(frozen=True)
class ViewPlan:
    """Which views of a 360° camera to look through for one frame (None: all of them)."""

    views: list | None


def camera_models(config: VisionConfig):
    """The camera's projection (360°) and thermal conversion, when it declares them."""
    camera = config.camera
    projection = thermal = None
    if camera.projection is not None:
        from agent.vision.projection import Projection

        projection = Projection(camera.projection)
    if camera.thermal is not None:
        from agent.vision.thermal import ThermalImage

        thermal = ThermalImage(camera.thermal)
    return projection, thermal


class OverlappedRun:
    """Three stages on their own threads: ``prepare`` of frame n+2, ``infer`` of n+1, ``judge`` of n.

    The interpreter releases the GIL during ``invoke()``, and OpenCV during
    resizing, so with one interpreter thread per spare core the invoke thread
    does nothing but run the model: cutting, resizing and quantising the next
    frame, tracking and rules of the last one run on another core. Iterating
    yields each frame's messages, in frame order; errors of ``read`` (a lost
    camera) are raised here.
    """

    _END = object()

    def __init__(self, pipeline: VisionPipeline, read):
        self.pipeline = pipeline
        self._read = read
        self._prepared: queue.Queue = queue.Queue(maxsize=1)
        self._looked: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._prepare, name="vision-prepare", daemon=True),
            threading.Thread(target=self._infer, name="vision-infer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _prepare(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self._read()
                if frame is None:
                    break
                self._put(self._prepared, (frame, self.pipeline.prepare(frame)))
        except Exception as exc:
            self._put(self._prepared, exc)
            return
        self._put(self._prepared, self._END)

    def _infer(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._prepared.get(timeout=0.2)
            except queue.Empty:  # look at the stop flag again
                continue
            if item is self._END or isinstance(item, Exception):
                self._put(self._looked, item)
                return
            frame, prepared = item
            try:
                self._put(self._looked, (frame, self.pipeline.infer(frame, prepared)))
            except Exception as exc:
                self._put(self._looked, exc)
                return

    def _put(self, target, item) -> None:
        put_unless_stopped(target, item, self._stop)

    def __iter__(self):
        while True:
            item = self._looked.get()
            if item is self._END:
                return
            if isinstance(item, Exception):
                raise item
            frame, detections = item
            yield self.pipeline.judge(frame, detections)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
