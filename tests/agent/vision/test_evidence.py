"""Evidence JPEGs: heads blurred and masks blacked out before storage; deleted after their retention."""

import hashlib
import os
import stat
import time

import cv2
import numpy as np

from agent.vision.evidence import EvidenceStore, redact
from agent.vision.tracking import Track
from tests.agent.vision.scenes import vtest_frames


def detail(image: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def people_in(frame, ssd):
    return [
        Track(i, "person", d.box, 0.0, 0.0)
        for i, d in enumerate(ssd.detect(frame.rgb))
        if d.label == "person" and d.score > 0.5
    ]


def head(image, person, fraction=0.35):
    h, w = image.shape[:2]
    x1, y1, x2, y2 = person.box
    return image[int(y1 * h) : int((y1 + (y2 - y1) * fraction) * h), int(x1 * w) : int(x2 * w)]


def test_head_regions_are_measurably_blurred_and_the_rest_is_not(ssd):
    frame = list(vtest_frames(limit=200))[-1]
    persons = [p for p in people_in(frame, ssd) if (p.box[3] - p.box[1]) * 576 > 60]  # the bigger, nearer ones
    assert persons
    redacted = redact(frame.rgb, persons, masks=[])
    for person in persons:
        before, after = detail(head(frame.rgb, person)), detail(head(redacted, person))
        assert after < 0.2 * before, (before, after)
    lawn = (slice(450, 560), slice(20, 200))  # no one there
    assert np.array_equal(frame.rgb[lawn], redacted[lawn])
    assert not np.array_equal(frame.rgb, redacted) and frame.rgb is not redacted


def test_privacy_masks_are_blacked_out():
    image = np.full((100, 200, 3), 200, np.uint8)
    redacted = redact(image, [], masks=[[(0.0, 0.0), (0.5, 0.0), (0.5, 0.5), (0.0, 0.5)]])
    assert redacted[:45, :95].max() == 0 and redacted[60:, 110:].min() == 200


def test_stored_evidence_is_redacted_private_hashed_and_expires(tmp_path, ssd):
    frame = list(vtest_frames(limit=200))[-1]
    persons = [p for p in people_in(frame, ssd) if (p.box[3] - p.box[1]) * 576 > 60]
    store = EvidenceStore(tmp_path / "evidence", retention_s=60)
    reference = store.save(frame.rgb, persons, "event-1")
    path = tmp_path / "evidence" / "event-1.jpg"
    assert (
        reference["ref"] == "evidence/event-1.jpg"
        and reference["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    for person in persons:
        assert detail(head(stored, person)) < 0.3 * detail(head(frame.rgb, person))
    assert store.purge() == 0
    old = time.time() - 120
    os.utime(path, (old, old))
    assert store.purge() == 1 and not path.exists()
