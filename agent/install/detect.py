"""``edge-agent detect FILE``: run the detector on an image or a video and print what it sees."""

from __future__ import annotations

import json
from pathlib import Path

from agent.errors import CameraError, ConfigError, ModelError


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
    from agent.vision.annotate import annotate, write_png
    from agent.vision.detector import Detector
    from hw.camera import CameraUnavailable
    from hw.camera_opencv import OpenCVCamera
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
    image = cv2.imread(str(file)) if file.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp") else None
    frames = []
    if image is not None:
        frames = [cv2.cvtColor(image, cv2.COLOR_BGR2RGB)]
    last = None
    try:
        source = iter(frames) if frames else _video_frames(OpenCVCamera(str(file)))
        for index, rgb in enumerate(source):
            if index >= max_frames:
                break
            if index % every:
                continue
            detections = detector.detect(rgb)
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
        write_png(annotate_path, annotate(last[0], last[1], vision))
    return 0


def _video_frames(camera):
    with camera:
        while (frame := camera.read()) is not None:
            yield frame.rgb


def run_snapshot(config_path: Path, out: Path, detect: bool = True, warmup_frames: int = 5) -> int:
    """``edge-agent snapshot``: one frame from the configured camera with zones, masks and detections drawn."""
    import logging

    from agent.config.device import load_agent_config
    from agent.vision.annotate import annotate, write_png
    from agent.vision.detector import Detector
    from hw.camera import CameraUnavailable, open_camera, redact_url

    config = load_agent_config(config_path)
    vision = config.vision_config()
    if vision is None:
        raise ConfigError(f"{config_path} has no [camera] section: nothing to take a snapshot with")
    settings = vision.camera
    login = config.camera_login()
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
    if detect:
        try:
            detector = Detector.from_settings(vision.detector, config.model_dir)
            detections = detector.detect(frame.rgb)
        except ModelError as exc:
            logging.getLogger(__name__).warning("snapshot without detections: %s", exc)
    write_png(out, annotate(frame.full if frame.full is not None else frame.rgb, detections, vision))
    print(
        json.dumps(
            {"out": str(out), "size": list(frame.rgb.shape[1::-1]), "detections": [d.as_dict() for d in detections]}
        )
    )
    return 0
