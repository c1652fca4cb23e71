"""``edge-agent detect``: what an installer runs to see what the model sees."""

import json
import shutil
import stat

import cv2
import numpy as np

from agent.cli import main
from tests.agent.vision.scenes import MODEL_DIR, VIDEO, require_shared


def test_detect_prints_json_lines_and_writes_an_annotated_picture(tmp_path, capsys, model_dir_with_faces):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    out = tmp_path / "seen.png"
    command = ["detect", str(VIDEO), "--model-dir", str(model_dir_with_faces), "--max-frames", "3", "--annotate"]
    assert main([*command, str(out)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["frame"] for line in lines] == [0, 1, 2]
    assert all(any(d["label"] == "person" for d in line["detections"]) for line in lines)
    assert lines[0]["runtime"] == "litert" and lines[0]["model"] == "ssd-mobilenet-v1-coco-quant"
    picture = cv2.imread(str(out))
    assert picture.shape == (576, 768, 3) and stat.S_IMODE(out.stat().st_mode) == 0o600


def test_detect_on_an_image_with_the_yolo_model(tmp_path, capsys):
    require_shared("data/vtest.avi", "models/yolov8n_int8.tflite")
    capture = cv2.VideoCapture(str(VIDEO))
    ok, frame = capture.read()
    capture.release()
    image = tmp_path / "frame.jpg"
    cv2.imwrite(str(image), frame)
    assert main(["detect", str(image), "--model", "yolov8n-int8", "--model-dir", str(MODEL_DIR)]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["model"] == "yolov8n-int8" and any(d["label"] == "person" for d in line["detections"])


def test_detect_uses_the_device_config_zones(site, tmp_path, capsys, faces_dir):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    shutil.copy(MODEL_DIR / "ssd_mobilenet_v1_coco_quant.tflite", tmp_path)
    shutil.copy(faces_dir / "face_detection_full_range.tflite", tmp_path)
    body = (
        f'[camera]\nsource = "{VIDEO}"\n[detector]\nmodel_dir = "{tmp_path}"\nmin_score = 0.6\n'
        '[[zones]]\nname = "gate"\npolygon = [[0.1, 0.1], [0.9, 0.1], [0.9, 0.9]]\n'
    )
    site.add_device("cam-9", kind="camera-box", body=body)
    out = tmp_path / "zones.png"
    assert (
        main(
            [
                "detect",
                str(VIDEO),
                "--config",
                str(site.device_config_path("cam-9")),
                "--max-frames",
                "1",
                "--annotate",
                str(out),
            ]
        )
        == 0
    )
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert all(d["score"] >= 0.6 for d in line["detections"])
    assert out.exists()


def test_detect_errors_are_specific(tmp_path, capsys):
    assert main(["detect", str(tmp_path / "nope.mp4"), "--model-dir", str(tmp_path)]) == 1
    assert (
        "does not exist; fetch it with 'edge-agent models fetch ssd-mobilenet-v1-coco-quant'" in capsys.readouterr().err
    )
    require_shared("models/ssd_mobilenet_v1_coco_quant.tflite")
    assert main(["detect", str(tmp_path / "nope.mp4"), "--model-dir", str(MODEL_DIR)]) == 1
    assert "nope.mp4: no such file" in capsys.readouterr().err
    assert main(["detect", str(tmp_path), "--model-dir", str(MODEL_DIR), "--every", "0"]) == 2


def test_snapshot_draws_zones_and_applies_privacy_masks(site, tmp_path, capsys, model_dir_with_faces):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    body = (
        f'[camera]\nsource = "{VIDEO}"\n[detector]\nmodel_dir = "{model_dir_with_faces}"\n'
        '[[zones]]\nname = "gate"\npolygon = [[0.5, 0.5], [0.9, 0.5], [0.9, 0.9], [0.5, 0.9]]\n'
        "[[privacy_masks]]\npolygon = [[0.0, 0.0], [0.3, 0.0], [0.3, 0.2], [0.0, 0.2]]\n"
    )
    site.add_device("cam-snap", kind="camera-box", body=body)
    out = tmp_path / "aim.png"
    assert main(["snapshot", "--config", str(site.device_config_path("cam-snap")), "--out", str(out)]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["size"] == [768, 576] and any(d["label"] == "person" for d in reply["detections"])
    picture = cv2.imread(str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and reply["faces_covered"] >= 0
    assert picture[:100, :200].max() == 0  # the neighbour's windows are blacked out
    zone_edge = picture[int(0.5 * 576), int(0.6 * 768)]
    assert tuple(zone_edge) == (0, 200, 255)  # the zone outline (BGR of the RGB zone colour)


def test_snapshot_needs_a_camera(site, capsys):
    site.add_device("cp-snap")
    assert main(["snapshot", "--config", str(site.device_config_path("cp-snap")), "--out", "/tmp/x.png"]) == 2
    assert "has no [camera] section" in capsys.readouterr().err


def test_pictures_for_installers_cover_heads_too(tmp_path, capsys, model_dir_with_faces):
    """The picture written is the redactor's (how well it redacts: test_redaction), boxes drawn on top."""
    from agent.vision.redaction import Redactor

    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    out = tmp_path / "seen.png"
    command = ["detect", str(VIDEO), "--model-dir", str(model_dir_with_faces), "--max-frames", "1", "--annotate"]
    assert main([*command, str(out)]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    people = [d["box"] for d in line["detections"] if d["label"] == "person"]
    x1, y1, x2, y2 = max(people, key=lambda box: box[3] - box[1])
    head = (slice(int(y1 * 576) + 3, int((y1 + (y2 - y1) * 0.2) * 576)), slice(int(x1 * 768) + 3, int(x2 * 768) - 3))
    capture = cv2.VideoCapture(str(VIDEO))
    original = cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2RGB)
    capture.release()
    expected = Redactor.load("blazeface-full-range", model_dir_with_faces).redact(original, people)
    drawn = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    assert np.mean(np.all(drawn[head] == expected[head], axis=-1)) > 0.9
    assert np.mean(np.all(original[head] == expected[head], axis=-1)) < 0.2


def test_no_installer_picture_without_the_face_model(site, tmp_path, capsys):
    """detect --annotate and snapshot refuse to write a picture they cannot redact, and say why."""
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    out = tmp_path / "seen.png"
    assert main(["detect", str(VIDEO), "--model-dir", str(MODEL_DIR), "--max-frames", "1", "--annotate", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{out} not written: face model for redaction unavailable" in err
    assert "edge-agent models fetch blazeface-full-range" in err and not out.exists()
    body = f'[camera]\nsource = "{VIDEO}"\n[detector]\nmodel_dir = "{MODEL_DIR}"\n'
    site.add_device("cam-noface", kind="camera-box", body=body)
    assert main(["snapshot", "--config", str(site.device_config_path("cam-noface")), "--out", str(out)]) == 1
    assert "not written: face model for redaction unavailable" in capsys.readouterr().err and not out.exists()
