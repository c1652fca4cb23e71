"""Models given by path: ``--model path/to/model.tflite`` is described from the file itself."""

import json
import shutil
from pathlib import Path

import cv2
import pytest

from agent.cli import main
from agent.errors import ModelError
from agent.vision.detector import spec_for_file
from models import find_model
from tests.agent.vision.scenes import MODEL_DIR, VIDEO, require_shared

SSD = MODEL_DIR / "ssd_mobilenet_v1_coco_quant.tflite"
YOLO = MODEL_DIR / "yolov8n_int8.tflite"
FACE_MODELS = [Path.home() / ".cache/edge-agent/models/face_detection_short_range.tflite"]


@pytest.fixture
def frame_jpg(tmp_path):
    require_shared("data/vtest.avi")
    capture = cv2.VideoCapture(str(VIDEO))
    ok, frame = capture.read()
    capture.release()
    image = tmp_path / "frame.jpg"
    cv2.imwrite(str(image), frame)
    return image


@pytest.mark.parametrize(
    "path,manifest_name", [(SSD, "ssd-mobilenet-v1-coco-quant"), (YOLO, "yolov8n-int8")], ids=["ssd", "yolov8"]
)
def test_a_model_file_is_described_as_its_manifest_entry_says(path, manifest_name):
    require_shared(f"models/{path.name}")
    read, listed = spec_for_file(path), find_model(manifest_name)
    for field in ("family", "input_size", "resize", "labels", "label_format", "sha256"):
        assert getattr(read, field) == getattr(listed, field), field
    assert read.input_range == pytest.approx(listed.input_range, abs=0.01)


@pytest.mark.parametrize("path", [SSD, YOLO], ids=["ssd", "yolov8"])
def test_detect_takes_a_model_path_without_a_model_dir(path, frame_jpg, capsys):
    require_shared(f"models/{path.name}")
    assert main(["detect", str(frame_jpg), "--model", str(path)]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["model"] == path.stem
    assert sum(d["label"] == "person" for d in line["detections"]) >= 2


def test_labels_next_to_the_model_are_used(tmp_path, frame_jpg, capsys):
    require_shared(f"models/{YOLO.name}")
    model = tmp_path / "plaza.tflite"
    shutil.copy(YOLO, model)
    names = (Path(__file__).parents[3] / "models" / "coco80.txt").read_text().splitlines()
    model.with_suffix(".txt").write_text("\n".join(["walker"] + names[1:]) + "\n")
    assert main(["detect", str(frame_jpg), "--model", str(model)]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert any(d["label"] == "walker" for d in line["detections"])


def test_a_file_that_is_no_model_is_refused_with_its_name(tmp_path, frame_jpg, capsys):
    fake = tmp_path / "holiday.tflite"
    fake.write_bytes(b"\x89PNG not a model at all" * 10)
    assert main(["detect", str(frame_jpg), "--model", str(fake)]) == 1
    assert f"{fake} is not a loadable TFLite model" in capsys.readouterr().err
    assert main(["detect", str(frame_jpg), "--model", str(tmp_path / "absent.tflite")]) == 1
    assert "absent.tflite does not exist" in capsys.readouterr().err


def test_a_model_of_another_family_is_refused_with_what_was_found():
    """A real TFLite model that is no object detector of either family (MediaPipe's face detector)."""
    face = next((p for p in FACE_MODELS if p.is_file()), None)
    if face is None:
        pytest.skip("no face detection model in the cache (the redaction models fetch it)")
    with pytest.raises(ModelError, match="cannot tell the model family from its outputs"):
        spec_for_file(face)


def test_a_detector_section_may_name_the_model_file(tmp_path):
    require_shared(f"models/{YOLO.name}")
    from agent.config.vision import DetectorSection
    from agent.vision.detector import Detector

    detector = Detector.from_settings(DetectorSection(model=str(YOLO)), tmp_path / "unused-model-dir")
    assert (detector.spec.family, detector.spec.resize, (detector.width, detector.height)) == (
        "yolov8",
        "letterbox",
        (640, 640),
    )
