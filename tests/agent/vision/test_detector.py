"""Both model families find the people in the real footage; bad model files are refused clearly."""

import shutil
import sys

import pytest

from agent.errors import ModelError
from agent.vision.detector import Detector, load_interpreter
from models import ModelSpec, find_model, load_labels, sha256_of
from tests.agent.vision.scenes import MODEL_DIR, require_shared, vtest_frames


def person_rate(detector, step: int = 10) -> float:
    frames = list(vtest_frames())[::step]
    with_person = sum(any(d.label == "person" for d in detector.detect(f.rgb)) for f in frames)
    return with_person / len(frames)


def test_ssd_sees_a_person_in_nearly_every_frame(ssd):
    assert ssd.runtime == "litert"
    assert person_rate(ssd) >= 0.97


def test_yolov8_sees_a_person_in_nearly_every_frame(yolo):
    assert person_rate(yolo) >= 0.95


def test_boxes_are_normalised_and_agree_between_families(ssd, yolo):
    frame = next(vtest_frames(limit=1))
    for detector in (ssd, yolo):
        for d in detector.detect(frame.rgb):
            assert 0 <= d.box[0] < d.box[2] <= 1 and 0 <= d.box[1] < d.box[3] <= 1
    ssd_people = [d for d in ssd.detect(frame.rgb) if d.label == "person" and d.score > 0.6]
    yolo_people = [d for d in yolo.detect(frame.rgb) if d.label == "person"]

    def iou(a, b):
        ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    assert ssd_people and all(max(iou(s.box, y.box) for y in yolo_people) > 0.4 for s in ssd_people)


def test_label_formats(tmp_path):
    offset = (
        load_labels(MODEL_DIR / "coco_labelmap_ssd.txt", "offset")
        if (MODEL_DIR / "coco_labelmap_ssd.txt").exists()
        else pytest.skip("labels absent")
    )
    assert offset[0] == "person" and offset[26] == "backpack" and 11 not in offset  # '???' slots are left out
    indexed = tmp_path / "indexed.txt"
    indexed.write_text("0  person\n1: bicycle\n")
    assert load_labels(indexed, "indexed") == {0: "person", 1: "bicycle"}
    indexed.write_text("person\n")
    with pytest.raises(ModelError, match=r"indexed.txt:1: expected 'index label', got 'person'"):
        load_labels(indexed, "indexed")


def copy_model(tmp_path, name="yolov8n_int8.tflite"):
    require_shared(f"models/{name}")
    shutil.copy(MODEL_DIR / name, tmp_path / name)
    return tmp_path


def test_missing_model_file_names_the_fetch_command(tmp_path):
    with pytest.raises(
        ModelError,
        match=r"model file .*ssd_mobilenet_v1_coco_quant.tflite for "
        r"'ssd-mobilenet-v1-coco-quant' does not exist; fetch it with "
        r"'edge-agent models fetch ssd-mobilenet-v1-coco-quant'",
    ):
        Detector(find_model("ssd-mobilenet-v1-coco-quant"), tmp_path)


def test_model_with_the_wrong_sha256_is_refused(tmp_path):
    model_dir = copy_model(tmp_path)
    with (model_dir / "yolov8n_int8.tflite").open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(ModelError, match=r"has sha256 [0-9a-f]{64}, but the manifest expects d473874e.* refusing"):
        Detector(find_model("yolov8n-int8"), model_dir)


def test_corrupt_model_file_is_not_loadable(tmp_path):
    path = tmp_path / "broken.tflite"
    path.write_bytes(b"TFL3" + b"\x00" * 200)
    spec = find_model("yolov8n-int8").model_copy(update={"file": "broken.tflite", "sha256": sha256_of(path)})
    with pytest.raises(ModelError, match=r"broken.tflite is not a loadable TFLite model"):
        Detector(spec, tmp_path)


def test_label_file_that_does_not_match_the_model(tmp_path):
    model_dir = copy_model(tmp_path)
    (model_dir / "coco80.txt").write_text("\n".join(f"class{i}" for i in range(79)) + "\n")
    with pytest.raises(ModelError, match=r"coco80.txt describes 79 classes but model 'yolov8n-int8' has 80"):
        Detector(find_model("yolov8n-int8"), model_dir)


def test_ssd_label_count_is_checked_against_the_manifest(tmp_path):
    model_dir = copy_model(tmp_path, "ssd_mobilenet_v1_coco_quant.tflite")
    (model_dir / "coco_labelmap_ssd.txt").write_text("???\nperson\ncar\n")
    with pytest.raises(ModelError, match="describes 2 classes but model 'ssd-mobilenet-v1-coco-quant' has 90"):
        Detector(find_model("ssd-mobilenet-v1-coco-quant"), model_dir)


def hide_modules(monkeypatch, *names):
    """As if these packages were not installed (import of them fails)."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, f"{name}.interpreter", None)


def test_tflite_runtime_is_the_fallback_when_litert_is_missing(monkeypatch):
    require_shared("models/ssd_mobilenet_v1_coco_quant.tflite")
    pytest.importorskip("tflite_runtime", reason="tflite-runtime has no wheel for this Python/platform")
    hide_modules(monkeypatch, "ai_edge_litert")
    detector = Detector(find_model("ssd-mobilenet-v1-coco-quant"), MODEL_DIR, min_score=0.4)
    assert detector.runtime == "tflite-runtime"
    frame = next(vtest_frames(limit=1))
    assert any(d.label == "person" for d in detector.detect(frame.rgb))


def test_no_runtime_at_all_is_reported(monkeypatch):
    require_shared("models/yolov8n_int8.tflite")
    hide_modules(monkeypatch, "ai_edge_litert", "tflite_runtime")
    with pytest.raises(
        ModelError,
        match="no TFLite runtime is installed .*litert: .*tflite-runtime: .*"
        r"install ai-edge-litert \(pip install 'edge-agent\[detect\]'\)",
    ):
        load_interpreter(MODEL_DIR / "yolov8n_int8.tflite")


def test_manifest_entries_are_complete():
    spec = find_model("ssd-mobilenet-v1-coco-quant")
    assert isinstance(spec, ModelSpec) and spec.url and spec.sha256 and not spec.test_only
    assert find_model("yolov8n-int8").test_only  # AGPL weights: never fetched for devices
    with pytest.raises(ModelError, match="no model named 'nope'"):
        find_model("nope")
