"""The vision process: camera → pipeline, reporting to the agent over a queue.

Runs in its own process (started by ``supervisor``), at a lower scheduling
priority, so a saturated CPU, a hung camera read or a crashed interpreter
never delays the buttons in the agent process. It sends:

* ``("message", {"kind", "body"})`` for each rule event,
* ``("heartbeat", stats)`` at least once a second while it makes progress,
* ``("fault", component, text)`` once when a part fails, ``("recovered", component, text)`` when it is back,
* ``("fatal", text)`` when it cannot run at all (bad model), then exits.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def run_vision(vision_json: str, model_dir: str, evidence_dir: str, out: Any, stop: Any) -> None:
    """Entry point of the vision process."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s[vision]: %(message)s")
    from ..config_vision import VisionConfig
    from ..errors import ModelError

    config = VisionConfig.model_validate_json(vision_json)
    try:
        os.nice(config.vision.nice)
    except OSError:
        pass
    try:
        pipeline = _build_pipeline(config, Path(model_dir), Path(evidence_dir))
    except ModelError as exc:
        out.put(("fatal", "detector", str(exc)))
        return
    out.put(("heartbeat", pipeline.stats()))
    _run_camera_loop(config, pipeline, out, stop)


def _build_pipeline(config, model_dir: Path, evidence_dir: Path):

    from .detector import Detector
    from .evidence import EvidenceStore
    from .pipeline import VisionPipeline

    detector = Detector.from_settings(config.detector, model_dir)
    evidence = None
    if any(rule.evidence for rule in config.rules):
        evidence = EvidenceStore(
            evidence_dir,
            config.evidence.retention_s,
            config.evidence.jpeg_quality,
            config.evidence.head_fraction,
            [m.polygon for m in config.privacy_masks],
        )
    return VisionPipeline(config, detector, evidence)


def _run_camera_loop(config, pipeline, out, stop) -> None:
    from hw.camera import CameraUnavailable, open_camera
    from hw.frame_prefetch import FramePrefetcher

    from .pipeline import OverlappedRun

    settings = config.camera
    camera = open_camera(
        settings.source,
        width=settings.width,
        height=settings.height,
        fps=settings.fps,
        realtime=settings.realtime,
        loop=settings.loop,
        rtsp_transport=settings.rtsp_transport,
    )
    failing, backoff = False, 1.0
    beats = _Heartbeat(out, pipeline)
    while not stop.is_set():
        beats.maybe_send(failing)
        reader = run = None
        try:
            camera.open()  # a camera that hangs here stops the heartbeats: the supervisor restarts us
            reader = FramePrefetcher(camera, depth=2, drop_old=not getattr(camera, "is_file", False))
            run = OverlappedRun(pipeline, reader.read)
            for messages in run:  # a read that hangs stops the heartbeats too
                if failing:
                    out.put(("recovered", "camera", f"camera {settings.source} delivers frames again"))
                    failing, backoff = False, 1.0
                for message in messages:
                    out.put(("message", message))
                beats.maybe_send(failing)
                if stop.is_set():
                    break
            else:
                out.put(("ended", "camera", f"video {settings.source} ended"))
                break
        except CameraUnavailable as exc:
            if not failing:
                out.put(("fault", "camera", str(exc)))
                failing = True
            stop.wait(backoff)
            backoff = min(backoff * 2, settings.reconnect_max_s)
        finally:
            for part in (run, reader, camera):
                if part is not None:
                    part.close()
    out.put(("heartbeat", pipeline.stats()))


class _Heartbeat:
    """At most one heartbeat a second, and the evidence clean-up once a minute."""

    def __init__(self, out, pipeline):
        self.out, self.pipeline = out, pipeline
        self.last_beat = self.last_purge = 0.0

    def maybe_send(self, failing: bool) -> None:
        now = time.monotonic()
        if now - self.last_beat >= 1.0:
            self.out.put(("heartbeat", {**self.pipeline.stats(), "camera_state": "fault" if failing else "ok"}))
            self.last_beat = now
        if self.pipeline.evidence is not None and now - self.last_purge >= 60:
            self.pipeline.evidence.purge()
            self.last_purge = now
