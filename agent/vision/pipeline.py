"""Frames in, signed-alert bodies out: motion gating → detection on regions → tracking → rules.

Runs inside the vision process (see ``worker``); knows nothing of MQTT or
the outbox. Every message it returns carries metadata only; an evidence
reference is added only for rules that ask for it.
"""

from __future__ import annotations

import time
from typing import Any

import cv2

from agent.config.vision import VisionConfig
from agent.errors import RedactionUnavailable
from agent.vision.camera_tamper import CameraTamperDetector
from agent.vision.detector import Detection, Detector
from agent.vision.evidence import EvidenceStore
from agent.vision.motion import MotionDetector, plan_regions
from agent.vision.rules import RuleEngine, RuleEvent, passes
from agent.vision.snapshot import SnapshotRequests
from agent.vision.tracking import ObjectTracker, Track
from hw.camera import Frame
from hw.frame_prefetch import put_unless_stopped

TAMPER_CHECK_EVERY_S = 0.25


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
        self.motion = MotionDetector(config.motion.threshold, config.motion.min_area) if config.motion.enabled else None
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
        }

    def process(self, frame: Frame) -> list[dict[str, Any]]:
        """One frame; returns ``{"kind", "body"}`` messages for the agent to sign and send."""
        return self.judge(frame, self.look(frame))

    def look(self, frame: Frame) -> list[Detection] | None:
        """First stage: motion gating and detection (None when the frame is skipped).

        Safe to run on another thread while ``judge`` handles the previous frame:
        it only reads ``self.tracks``, which ``judge`` replaces whole.
        """
        if self.thermal is not None:
            self.thermal.prepare(frame)
        if self.projection is not None:
            return self._look_views(frame)
        regions = self._regions(frame, frame.timestamp)
        return self._detect(frame, regions) if regions else None

    def _look_views(self, frame: Frame) -> list[Detection] | None:
        """360° cameras: detection on the perspective views that see motion or a track (all of them on the
        periodic pass), boxes mapped back to the source frame and merged across view seams."""
        h, w = frame.rgb.shape[:2]
        views = None
        if self.motion is not None and frame.timestamp - self._last_full < self.config.motion.full_frame_every_s:
            interest = self.motion.detect(frame.rgb)
            if not interest:
                return None
            views = self.projection.views_seeing(interest + [t.box for t in self.tracks], w / h)
        elif self.motion is not None:
            self._last_full = frame.timestamp
            self.motion.detect(frame.rgb)  # keeps the motion background current
        found = self.projection.detect(frame.full, self.detector, views)
        self.inference_ms_avg = 0.9 * self.inference_ms_avg + 0.1 * self.detector.last_invoke_ms
        if self.thermal is not None:
            found = self.thermal.gate(found, frame.raw)
        return [d for d in merge_detections(found) if d.label in self.track_labels and self._detection_ok(d)]

    def judge(self, frame: Frame, detections: list[Detection] | None) -> list[dict[str, Any]]:
        """Second stage: camera tamper, tracking and rules."""
        now = frame.timestamp
        self.frames += 1
        self._fps_window = (self._fps_window + [now])[-30:]
        messages = []
        if self.tamper is not None and now - self._last_tamper_check >= TAMPER_CHECK_EVERY_S:
            self._last_tamper_check = now  # tampering is judged over seconds; 4 looks a second are plenty
            reason, metrics = self.tamper.check(frame.rgb)
            for situation in self.tamper_rules:
                event = situation.step(reason is not None, {"reason": reason or "", **metrics}, now)
                if event is not None:
                    messages.append(self._message(event, frame))
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

    def _regions(self, frame: Frame, now: float) -> list[tuple[int, int, int, int]]:
        """Where to run the model: nowhere on a still scene; around motion and every track when something moves;
        the full frame plus every track on the periodic pass, so stationary objects stay tracked."""
        h, w = frame.rgb.shape[:2]
        if self.motion is None:
            return [(0, 0, w, h)]
        moved = self.motion.detect(frame.rgb)
        side = max(self.detector.width, self.detector.height)
        tracked = [t.box for t in self.tracks]
        if now - self._last_full >= self.config.motion.full_frame_every_s:
            self._last_full = now
            around_tracks = plan_regions(tracked, w, h, min_side=side, max_regions=self.config.motion.max_regions)
            return [(0, 0, w, h)] + [r for r in around_tracks if r != (0, 0, w, h)]
        if not moved:
            return []
        return plan_regions(moved + tracked, w, h, min_side=side, max_regions=self.config.motion.max_regions)

    def _detect(self, frame: Frame, regions: list[tuple[int, int, int, int]]) -> list[Detection]:
        """Regions are planned on the small detection frame but cut from the full-size one (picamera2's
        main stream), so a small, distant person is seen with all the pixels the sensor has."""
        h, w = frame.rgb.shape[:2]
        full_h, full_w = frame.full.shape[:2]
        sx, sy = full_w / w, full_h / h
        found: list[Detection] = []
        for x, y, rw, rh in regions:
            crop = frame.full[round(y * sy) : round((y + rh) * sy), round(x * sx) : round((x + rw) * sx)]
            for d in self.detector.detect(crop):
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
        if self.thermal is not None:
            found = self.thermal.gate(found, frame.raw)
        merged = merge_detections(found)
        self.people_seen = [d for d in merged if d.label == "person"]  # for redaction: whatever the filters say
        kept = [d for d in merged if d.label in self.track_labels and self._detection_ok(d)]
        return kept

    def _detection_ok(self, detection: Detection) -> bool:
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
    """Runs ``look`` for the next frame while ``judge`` handles this one.

    The interpreter releases the GIL during ``invoke()``, so tracking and rules
    cost no wall time on a multi-core Pi. Iterating yields each frame's
    messages, in frame order; errors of ``read`` (a lost camera) are raised here.
    """

    _END = object()

    def __init__(self, pipeline: VisionPipeline, read):
        import queue
        import threading

        self.pipeline = pipeline
        self._read = read
        self._looked: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._look, name="vision-look", daemon=True)
        self._thread.start()

    def _look(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self._read()
                if frame is None:
                    break
                self._put((frame, self.pipeline.look(frame)))
        except Exception as exc:
            self._put(exc)
            return
        self._put(self._END)

    def _put(self, item) -> None:
        put_unless_stopped(self._looked, item, self._stop)

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
        self._thread.join(timeout=2)
