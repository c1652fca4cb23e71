"""Real detectors over the shared models, loaded once per test module."""

import pytest

from models import find_model
from tests.agent.vision.scenes import MODEL_DIR, require_shared


@pytest.fixture(scope="module")
def ssd():
    require_shared("models/ssd_mobilenet_v1_coco_quant.tflite")
    from agent.vision.detector import Detector

    return Detector(find_model("ssd-mobilenet-v1-coco-quant"), MODEL_DIR, min_score=0.3)


@pytest.fixture(scope="module")
def yolo():
    require_shared("models/yolov8n_int8.tflite")
    from agent.vision.detector import Detector

    return Detector(find_model("yolov8n-int8"), MODEL_DIR, min_score=0.3)


@pytest.fixture(scope="session")
def faces_dir():
    """Where the BlazeFace face models are (fetched once into the user's cache when needed)."""
    from tests.agent.vision.scenes import face_model_dir

    face_model_dir("blazeface-short-range")
    return face_model_dir("blazeface-full-range")


@pytest.fixture(scope="session")
def model_dir_with_faces(tmp_path_factory, faces_dir):
    """One model directory with the shared detection models and the face models, as on a camera box."""
    require_shared("models/ssd_mobilenet_v1_coco_quant.tflite")
    directory = tmp_path_factory.mktemp("models")
    for source in [*MODEL_DIR.glob("*"), *faces_dir.glob("face_detection_*.tflite")]:
        (directory / source.name).symlink_to(source)
    return directory


@pytest.fixture(scope="module")
def redactor(faces_dir):
    from agent.vision.redaction import Redactor

    loaded = Redactor.load("blazeface-full-range", faces_dir)
    assert loaded.unavailable is None, loaded.unavailable
    return loaded
