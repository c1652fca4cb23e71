"""Evidence JPEGs: heads covered, faces filled and masks blacked out before storage; withheld when the
redaction cannot run; deleted after their retention."""

import hashlib
import math
import os
import stat
import time

import cv2
import numpy as np

from agent.config.vision import VisionConfig
from agent.vision.evidence import EvidenceStore
from agent.vision.pipeline import VisionPipeline
from agent.vision.redaction import Redactor
from agent.vision.tracking import Track
from tests.agent.vision.scenes import vtest_frames

PLAZA = [[0.0, 0.25], [1.0, 0.25], [1.0, 1.0], [0.0, 1.0]]


def detail(image: np.ndarray, across: int = 6) -> float:
    """What a mosaic of a few blocks across would lose: much on a face, little on a covered head (the solid
    face fill inside it is not aligned with the blocks). Whether faces are still findable: test_redaction."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    down = max(1, round(h / (w / across)))
    blocks = cv2.resize(
        cv2.resize(grey, (across, down), interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_NEAREST
    )
    return float(np.mean(np.abs(grey.astype(np.int16) - blocks)))


def people_in(frame, ssd):
    return [
        Track(i, "person", d.box, 0.0, 0.0)
        for i, d in enumerate(ssd.detect(frame.rgb))
        if d.label == "person" and d.score > 0.5
    ]


def head(image, person, fraction=0.35):
    h, w = image.shape[:2]
    x1, y1, x2, y2 = person.box
    return image[int(y1 * h) : math.ceil((y1 + (y2 - y1) * fraction) * h), int(x1 * w) : math.ceil(x2 * w)]


def test_head_regions_lose_their_detail_and_the_rest_does_not(ssd, redactor):
    frame = list(vtest_frames(limit=200))[-1]
    persons = [p for p in people_in(frame, ssd) if (p.box[3] - p.box[1]) * 576 > 60]  # the bigger, nearer ones
    assert persons
    redacted = redactor.redact(frame.rgb, [p.box for p in persons])
    for person in persons:
        before, after = detail(head(frame.rgb, person)), detail(head(redacted, person))
        assert after < 0.5 * before, (before, after)
    lawn = (slice(450, 560), slice(20, 200))  # no one there
    assert np.array_equal(frame.rgb[lawn], redacted[lawn])
    assert not np.array_equal(frame.rgb, redacted) and frame.rgb is not redacted


def test_privacy_masks_are_blacked_out(faces_dir):
    redactor = Redactor.load(
        "blazeface-full-range", faces_dir, masks=[[(0.0, 0.0), (0.5, 0.0), (0.5, 0.5), (0.0, 0.5)]]
    )
    image = np.full((100, 200, 3), 200, np.uint8)
    redacted = redactor.redact(image, [])
    assert redacted[:45, :95].max() == 0 and redacted[60:, 110:].min() == 200


def test_stored_evidence_is_redacted_private_hashed_and_expires(tmp_path, ssd, redactor):
    frame = list(vtest_frames(limit=200))[-1]
    persons = [p for p in people_in(frame, ssd) if (p.box[3] - p.box[1]) * 576 > 60]
    store = EvidenceStore(tmp_path / "evidence", 60, redactor)
    reference = store.save(frame.rgb, persons, "event-1")
    path = tmp_path / "evidence" / "event-1.jpg"
    assert (
        reference["ref"] == "evidence/event-1.jpg"
        and reference["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    for person in persons:
        assert detail(head(stored, person)) < 0.5 * detail(head(frame.rgb, person))
    assert store.purge() == 0
    old = time.time() - 120
    os.utime(path, (old, old))
    assert store.purge() == 1 and not path.exists()


def intrusion_with_evidence(ssd, store) -> list[dict]:
    config = VisionConfig.model_validate(
        {
            "camera": {"source": "vtest.avi", "name": "plaza"},
            "motion": {"enabled": False},
            "zones": [{"name": "plaza", "polygon": PLAZA}],
            "rules": [{"name": "plaza-intrusion", "type": "intrusion", "zone": "plaza", "evidence": True}],
        }
    )
    pipeline = VisionPipeline(config, ssd, store)
    messages = [m for frame in vtest_frames(limit=30) for m in pipeline.process(frame)]
    return [m["body"] for m in messages if m["kind"] == "alert"], pipeline


def test_the_alert_says_evidence_was_withheld_when_the_face_model_is_missing(tmp_path, ssd):
    store = EvidenceStore(tmp_path / "evidence", 60, Redactor.load("blazeface-full-range", tmp_path / "no-models"))
    alerts, pipeline = intrusion_with_evidence(ssd, store)
    assert alerts and all("evidence" not in body for body in alerts)
    assert "face model for redaction unavailable" in alerts[0]["evidence_withheld"]
    assert "face_detection_full_range.tflite" in alerts[0]["evidence_withheld"]
    assert pipeline.stats()["evidence_withheld"] == len(alerts)
    assert list((tmp_path / "evidence").iterdir()) == []


def test_the_alert_carries_redacted_evidence_when_the_face_model_runs(tmp_path, ssd, redactor):
    alerts, _ = intrusion_with_evidence(ssd, EvidenceStore(tmp_path / "evidence", 60, redactor))
    assert alerts and "evidence_withheld" not in alerts[0]
    (path,) = (tmp_path / "evidence").iterdir()
    assert alerts[0]["evidence"]["ref"] == f"evidence/{path.name}" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_people_the_filters_drop_still_have_their_heads_covered(ssd):
    config = VisionConfig.model_validate(
        {
            "camera": {"source": "vtest.avi", "name": "plaza"},
            "motion": {"enabled": False},
            "detector": {"track_labels": ["suitcase"]},
            "filters": {"person": {"min_score": 0.99}},
        }
    )
    pipeline = VisionPipeline(config, ssd)
    frame = next(vtest_frames(limit=1))
    assert pipeline.look(frame) == []  # nothing tracked …
    assert len(pipeline.people_seen) >= 3  # … but every person seen is kept for redaction


def test_the_vision_process_reports_a_redaction_fault_and_keeps_detecting(tmp_path):
    """A camera box whose face model is missing says so once, at start; detection is not stopped by it."""
    import queue
    import threading

    from agent.vision.worker import run_vision
    from tests.agent.vision.scenes import MODEL_DIR, require_shared

    require_shared("models/ssd_mobilenet_v1_coco_quant.tflite")
    config = VisionConfig.model_validate(
        {
            "camera": {"source": "vtest.avi", "name": "plaza"},
            "vision": {"nice": 0},
            "zones": [{"name": "plaza", "polygon": PLAZA}],
            "rules": [{"name": "plaza-intrusion", "type": "intrusion", "zone": "plaza", "evidence": True}],
        }
    )
    out, stop = queue.Queue(), threading.Event()
    stop.set()  # build the pipeline, report, and return without reading the camera
    run_vision(config.model_dump_json(), str(MODEL_DIR), str(tmp_path / "evidence"), out, stop)
    reports = [out.get_nowait() for _ in range(out.qsize())]
    faults = [r for r in reports if r[0] == "fault" and r[1] == "redaction"]
    assert len(faults) == 1 and "face model for redaction unavailable" in faults[0][2]
    assert faults[0][2].endswith("evidence is withheld")
    assert not any(r[0] == "fatal" for r in reports) and any(r[0] == "heartbeat" for r in reports)
