"""The vision process: camera → pipeline, reporting to the agent over a queue.

Runs in its own process (started by ``supervisor``), at a lower scheduling
priority (``vision.nice`` steps nicer than the agent), so a saturated CPU, a
hung camera read or a crashed interpreter never delays the buttons in the
agent process. It sends:

* ``("message", {"kind", "body"})`` for each rule event,
* ``("heartbeat", stats)`` once the model is loaded, then at least once a second while it makes progress;
  the stats carry ``nice`` (and ``nice_error`` when the priority could not be lowered),
* ``("fault", component, text)`` once when a part fails, ``("recovered", component, text)`` when it is back
  (component ``priority`` when the process could not lower its own priority),
* ``("fatal", text)`` when it cannot run at all (bad model), then exits.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from agent.runtime.backoff import Backoff

log = logging.getLogger(__name__)

#: First wait before a lost camera is opened again; doubles up to ``camera.reconnect_max_s``.
CAMERA_RETRY_FIRST_S = 1.0


def run_vision(
    vision_json: str, model_dir: str, evidence_dir: str, out: Any, stop: Any, camera_password: str | None = None
) -> None:
    """Entry point of the vision process; ``camera_password`` is the camera login's, read by the agent."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s[vision]: %(message)s")
    from agent.config.vision import VisionConfig
    from agent.errors import ModelError

    config = VisionConfig.model_validate_json(vision_json)
    # Before any thread exists: Linux keeps a niceness per thread, and new threads inherit it.
    priority = lower_priority(config.vision.nice)
    if "nice_error" in priority:
        out.put(("fault", "priority", priority["nice_error"]))
    try:
        pipeline = _build_pipeline(config, Path(model_dir), Path(evidence_dir))
    except ModelError as exc:
        out.put(("fatal", "detector", str(exc)))
        return
    if pipeline.evidence is not None and pipeline.evidence.redactor.unavailable:
        out.put(("fault", "redaction", pipeline.evidence.redactor.unavailable + "; evidence is withheld"))
    beats = _Heartbeat(out, pipeline, priority)
    beats.send("starting")  # the first heartbeat: from here on the supervisor's stall timer runs
    _run_camera_loop(config, pipeline, beats, camera_password, stop)


def lower_priority(steps: int) -> dict[str, Any]:
    """Make this process ``steps`` nicer than it was started; returns its niceness and, on failure, why not.

    Under systemd this needs the ``setpriority`` system call, which the unit allows again after
    ``SystemCallFilter=~@resources``; raising the priority back is never possible there.
    """
    start = os.getpriority(os.PRIO_PROCESS, 0)
    wanted = min(19, start + steps)
    if wanted == start:
        return {"nice": start}
    try:
        os.setpriority(os.PRIO_PROCESS, 0, wanted)
    except OSError as exc:
        return {
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "nice_error": f"cannot lower the vision process's priority to nice {wanted}: {exc.strerror or exc}; "
            f"it runs at the agent's priority (nice {start})",
        }
    return {"nice": os.getpriority(os.PRIO_PROCESS, 0)}


def _build_pipeline(config, model_dir: Path, evidence_dir: Path):

    from agent.vision.detector import Detector
    from agent.vision.evidence import EvidenceStore
    from agent.vision.pipeline import VisionPipeline
    from agent.vision.redaction import Redactor

    detector = Detector.from_settings(config.detector, model_dir)
    evidence = None
    if any(rule.evidence for rule in config.rules):
        redactor = Redactor.for_camera(config, model_dir)  # when it cannot load, evidence is withheld, detection runs
        evidence = EvidenceStore(evidence_dir, config.evidence.retention_s, redactor, config.evidence.jpeg_quality)
    return VisionPipeline(config, detector, evidence)


def _run_camera_loop(config, pipeline, beats: _Heartbeat, camera_password: str | None, stop) -> None:
    from agent.vision.pipeline import OverlappedRun
    from hw.camera import CameraUnavailable, open_camera, redact_url
    from hw.frame_prefetch import FramePrefetcher

    settings = config.camera
    shown = redact_url(settings.source)
    out = beats.out
    camera = open_camera(
        settings.source,
        width=settings.width,
        height=settings.height,
        fps=settings.fps,
        realtime=settings.realtime,
        loop=settings.loop,
        rtsp_transport=settings.rtsp_transport,
        username=settings.username,
        password=camera_password,
        **({"y16": True} if settings.thermal is not None else {}),  # a thermal camera's 16-bit counts
    )
    failing, retry = False, Backoff(CAMERA_RETRY_FIRST_S, settings.reconnect_max_s)
    while not stop.is_set():
        beats.maybe_send(failing)
        reader = run = None
        try:
            camera.open()  # a camera that hangs here stops the heartbeats: the supervisor restarts us
            reader = FramePrefetcher(camera, depth=2, drop_old=not getattr(camera, "is_file", False))
            run = OverlappedRun(pipeline, reader.read)
            for messages in run:  # a read that hangs stops the heartbeats too
                if failing:
                    out.put(("recovered", "camera", f"camera {shown} delivers frames again"))
                    failing = False
                    retry.reset()
                for message in messages:
                    out.put(("message", message))
                beats.maybe_send(failing)
                if stop.is_set():
                    break
            else:
                out.put(("ended", "camera", f"video {shown} ended"))
                break
        except CameraUnavailable as exc:
            if not failing:
                out.put(("fault", "camera", redact_url(str(exc))))
                failing = True
            stop.wait(retry.next())
        finally:
            for part in (run, reader, camera):
                if part is not None:
                    part.close()
    beats.send("fault" if failing else "ok")


class _Heartbeat:
    """At most one heartbeat a second, and the evidence clean-up once a minute."""

    def __init__(self, out, pipeline, priority: dict[str, Any]):
        self.out, self.pipeline, self.priority = out, pipeline, priority
        self.last_beat = self.last_purge = 0.0

    def send(self, camera_state: str) -> None:
        stats = {**self.pipeline.stats(), **self.priority, "camera_state": camera_state}
        self.out.put(("heartbeat", stats))
        self.last_beat = time.monotonic()

    def maybe_send(self, failing: bool) -> None:
        now = time.monotonic()
        if now - self.last_beat >= 1.0:
            self.send("fault" if failing else "ok")
        if self.pipeline.evidence is not None and now - self.last_purge >= 60:
            self.pipeline.evidence.purge()
            self.last_purge = now
