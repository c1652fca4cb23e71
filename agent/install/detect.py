"""``edge-agent detect FILE``: run the detector on an image or a video and print what it sees."""

from __future__ import annotations

import json
from pathlib import Path

from agent.errors import CameraError, ConfigError, ModelError, RedactionUnavailable


def run_detect(
    file: Path,
    config_path: Path | None,
    model: str | None,
    model_dir: Path | None,
    threshold: float | None,
    annotate_path: Path | None,
    max_frames: int,
    every: int,
) -> int:
    import cv2

    from agent.config.device import load_agent_config
    from agent.config.vision import DetectorSection
    from agent.vision.annotate import write_png
    from agent.vision.detector import Detector
    from hw.camera import CameraUnavailable, Frame
    from hw.camera_opencv import OpenCVCamera, to_rgb
    from models.file_spec import is_model_path

    config = load_agent_config(config_path) if config_path else None
    vision = config.vision_config() if config else None
    settings = vision.detector if vision else DetectorSection()  # the defaults a camera box would use
    directory = model_dir or (config.model_dir if config and vision else None)
    if directory is None and not is_model_path(model or settings.model):
        raise ConfigError(
            "where is the model? give --model path/to/model.tflite, --model-dir DIR or --config FILE with a "
            "[detector] section"
        )
    detector = Detector.from_settings(settings, directory, model=model, min_score=threshold)
    if not file.exists():
        raise CameraError(f"{file}: no such file")
    redactor = _redactor(vision, directory, annotate_path) if annotate_path is not None else None
    image = cv2.imread(str(file), cv2.IMREAD_UNCHANGED) if file.suffix.lower() in _IMAGES else None
    frames = []
    if image is not None:  # 16-bit PNGs from a thermal camera are kept as they are (their temperatures)
        frames = [Frame(rgb=to_rgb(image), timestamp=0.0, index=0, raw=image if image.dtype == "uint16" else None)]
    look = CameraLook(vision, detector, redactor)
    last = None
    try:
        thermal = vision is not None and vision.camera.thermal is not None
        source = iter(frames) if frames else _video_frames(OpenCVCamera(str(file), y16=thermal))
        for index, frame in enumerate(source):
            if index >= max_frames:
                break
            if index % every:
                continue
            rgb, detections = look(frame)
            print(
                json.dumps(
                    {
                        "frame": index,
                        "inference_ms": round(detector.last_invoke_ms, 2),
                        "runtime": detector.runtime,
                        "model": detector.spec.name,
                        "detections": [d.as_dict() for d in detections],
                    }
                ),
                flush=True,
            )
            last = (rgb, detections)
    except CameraUnavailable as exc:
        raise CameraError(str(exc)) from None
    if last is None:
        raise CameraError(f"{file}: no frames could be read")
    if annotate_path is not None:
        write_png(annotate_path, look.picture(last[0], last[1]))
    return 0


_IMAGES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class CameraLook:
    """Detection as the camera box does it for this camera: its thermal conversion and body-temperature
    gate, and for a 360° camera detection on its perspective views with boxes mapped back to the frame."""

    def __init__(self, vision, detector, redactor=None):
        from agent.vision.pipeline import camera_models

        self.vision, self.detector, self.redactor = vision, detector, redactor
        self.projection, self.thermal = camera_models(vision) if vision is not None else (None, None)

    def __call__(self, frame) -> tuple:
        if self.thermal is not None:
            self.thermal.prepare(frame)
        if self.projection is not None:
            detections = self.projection.detect(frame.full, self.detector)
        else:
            detections = self.detector.detect(frame.full)
        if self.thermal is not None:
            detections = self.thermal.gate(detections, frame.raw)
        return frame.full, detections

    def picture(self, rgb, detections):
        """The installer's picture: redacted, zones and boxes drawn; a 360° camera's views beneath."""
        from agent.vision.annotate import annotate
        from agent.vision.projection import views_picture

        if self.projection is None:
            return annotate(rgb, detections, self.redactor, self.vision)
        h, w = rgb.shape[:2]
        placed = self.vision.model_copy(update={"zones": self.projection.zones_in_source(self.vision.zones, w / h)})
        return views_picture(annotate(rgb, detections, self.redactor, placed), self.projection)


def _redactor(vision, model_dir: Path, picture: Path):
    """The redactor for an installer's picture; refuses (no picture written) when it cannot run."""
    from agent.config.vision import VisionSettings
    from agent.vision.redaction import Redactor

    redactor = Redactor.for_camera(vision or VisionSettings(), Path(model_dir))
    if redactor.unavailable:
        raise RedactionUnavailable(
            f"{picture} not written: {redactor.unavailable} (fetch it with "
            f"'edge-agent models fetch {(vision or VisionSettings()).evidence.face_model}')"
        )
    return redactor


def _video_frames(camera):
    with camera:
        while (frame := camera.read()) is not None:
            yield frame


def run_snapshot(config_path: Path, out: Path, detect: bool = True, warmup_frames: int = 5) -> int:
    """``edge-agent snapshot``: one frame from the configured camera with zones, masks and detections drawn."""
    import logging

    from agent.config.device import load_agent_config
    from agent.vision.annotate import write_png
    from agent.vision.detector import Detector
    from hw.camera import CameraUnavailable, open_camera, redact_url

    config = load_agent_config(config_path)
    vision = config.vision_config()
    if vision is None:
        raise ConfigError(f"{config_path} has no [camera] section: nothing to take a snapshot with")
    redactor = _redactor(vision, config.model_dir, out)  # before the camera: no picture without it
    settings = vision.camera
    login = config.camera_login()
    if settings.thermal is not None:
        login["y16"] = True
    camera = open_camera(settings.source, width=settings.width, height=settings.height, fps=settings.fps, **login)
    try:
        with camera:
            frame = None
            for _ in range(warmup_frames):  # let exposure settle on live cameras
                frame = camera.read() or frame
    except CameraUnavailable as exc:
        raise CameraError(str(exc)) from None
    if frame is None:
        raise CameraError(f"camera {redact_url(settings.source)} delivered no frame")
    detections = []
    look = CameraLook(vision, None, redactor)
    if look.thermal is not None:
        look.thermal.prepare(frame)
    if detect:
        try:
            look.detector = Detector.from_settings(vision.detector, config.model_dir)
            _, detections = look(frame)
        except ModelError as exc:
            logging.getLogger(__name__).warning("snapshot without detections: %s", exc)
    write_png(out, look.picture(frame.full if frame.full is not None else frame.rgb, detections))
    print(
        json.dumps(
            {
                "out": str(out),
                "size": list(frame.rgb.shape[1::-1]),
                "detections": [d.as_dict() for d in detections],
                "faces_covered": redactor.last_faces,
            }
        )
    )
    return 0
