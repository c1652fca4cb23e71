"""Test scenes built from the real footage: vtest.avi as is, with a bag left behind, covered or blurred."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from hw.camera import Frame
from hw.camera_opencv import OpenCVCamera
from tests.conftest import SHARED_DIR

VIDEO = SHARED_DIR / "data" / "vtest.avi"
MODEL_DIR = SHARED_DIR / "models"
FPS = 10.0


def require_shared(*relative: str) -> None:
    for name in relative:
        if not (SHARED_DIR / name).exists():
            pytest.skip(f"{SHARED_DIR / name} is absent (set EDGE_AGENT_SHARED to the shared models and data)")


def vtest_frames(limit: int | None = None, start: int = 0) -> Iterator[Frame]:
    """Frames of vtest.avi with timestamps at its real 10 fps (so rules see real durations)."""
    require_shared("data/vtest.avi")
    with OpenCVCamera(str(VIDEO)) as camera:
        while (frame := camera.read()) is not None:
            if frame.index < start:
                continue
            if limit is not None and frame.index >= start + limit:
                return
            frame.timestamp = frame.index / FPS
            yield frame


def suitcase_sprite(width: int = 70, height: int = 90, colour=(120, 30, 30)) -> tuple[np.ndarray, np.ndarray]:
    """A still image of a hard-shell suitcase with a handle, and its mask."""
    top = height // 4
    image = np.zeros((height + top, width, 3), np.uint8)
    mask = np.zeros(image.shape[:2], np.uint8)
    dark = tuple(int(c * 0.6) for c in colour)
    cv2.rectangle(image, (0, top), (width - 1, top + height - 1), colour, -1)
    cv2.rectangle(mask, (0, top), (width - 1, top + height - 1), 255, -1)
    for k in range(1, 4):
        x = int(k * width / 4)
        cv2.line(image, (x, top + 3), (x, top + height - 4), dark, 2)
    cv2.rectangle(image, (0, top), (width - 1, top + height - 1), dark, 2)
    cv2.rectangle(image, (width // 3, 2), (2 * width // 3, top), dark, 3)
    cv2.rectangle(mask, (width // 3, 2), (2 * width // 3, top), 255, 3)
    return image, mask


def paste(frame: Frame, sprite: tuple[np.ndarray, np.ndarray], feet: tuple[float, float]) -> Frame:
    """The sprite standing with its bottom-centre at ``feet`` (normalised), over a copy of the frame."""
    image, mask = sprite
    rgb = frame.rgb.copy()
    h, w = rgb.shape[:2]
    sh, sw = image.shape[:2]
    x = int(np.clip(feet[0] * w - sw / 2, 0, w - sw))
    y = int(np.clip(feet[1] * h - sh, 0, h - sh))
    region = rgb[y : y + sh, x : x + sw]
    region[mask > 0] = image[mask > 0]
    return Frame(rgb=rgb, timestamp=frame.timestamp, index=frame.index)


def covered(frame: Frame, level: int = 6) -> Frame:
    """A hand or a bag over the lens: a nearly black picture with a little sensor noise."""
    noise = np.random.default_rng(frame.index).integers(0, 4, frame.rgb.shape, dtype=np.uint8)
    return Frame(rgb=np.full_like(frame.rgb, level) + noise, timestamp=frame.timestamp, index=frame.index)


def smeared(frame: Frame) -> Frame:
    """Grease or spray on the lens: the scene is still there, its detail is not."""
    return Frame(rgb=cv2.GaussianBlur(frame.rgb, (0, 0), sigmaX=12), timestamp=frame.timestamp, index=frame.index)


__all__ = ["MODEL_DIR", "VIDEO", "FPS", "Path"]


#: Face models are not among the shared test models: they are fetched once from their manifest URL into this cache.
FACE_MODEL_CACHE = Path(os.environ.get("EDGE_AGENT_MODEL_CACHE", Path.home() / ".cache" / "edge-agent" / "models"))
#: Real multi-person photographs: Debian's opencv-doc package (installed by .ci/run).
OPENCV_SAMPLES = Path("/usr/share/doc/opencv-doc/examples/data")


def face_model_dir(name: str = "blazeface-full-range") -> Path:
    """A directory holding the face model: the shared models if they have it, else the cache, fetched if absent."""
    from models import find_model, verify_model_file
    from models.errors import ModelError
    from models.fetch import fetch_model

    spec = find_model(name)
    for directory in (MODEL_DIR, FACE_MODEL_CACHE):
        try:
            verify_model_file(spec, directory)
            return directory
        except ModelError:
            continue
    try:
        fetch_model(spec, FACE_MODEL_CACHE, progress=False)
    except ModelError as exc:
        pytest.skip(f"face model {name} not available offline and not fetched: {exc}")
    return FACE_MODEL_CACHE


def opencv_sample(name: str) -> np.ndarray:
    """An RGB picture from OpenCV's samples (skips when the opencv-doc package is not installed)."""
    path = OPENCV_SAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} is absent (apt-get install opencv-doc)")
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
