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
