"""The pipeline on the real plaza footage: stable tracks, and rules that fire once per situation."""

from collections import defaultdict

import cv2
import numpy as np
import pytest

from agent.config.vision import VisionConfig
from agent.vision.pipeline import VisionPipeline
from agent.vision.tracking import ObjectTracker
from tests.agent.vision.scenes import covered, paste, smeared, suitcase_sprite, vtest_frames

PLAZA = [[0.0, 0.25], [1.0, 0.25], [1.0, 1.0], [0.0, 1.0]]
RIGHT_WALKWAY = [[0.55, 0.3], [1.0, 0.3], [1.0, 0.75], [0.55, 0.75]]


def vision(**settings) -> VisionConfig:
    return VisionConfig.model_validate({"camera": {"source": "vtest.avi", "name": "plaza"}, **settings})


def run(pipeline, frames) -> list[dict]:
    return [message for frame in frames for message in pipeline.process(frame)]


def by_rule(messages, name):
    return [m for m in messages if m["body"]["rule"] == name]


@pytest.fixture(scope="module")
def plaza_messages(ssd):
    """One pass over 40 s of footage with several rules, no motion gating (every frame inferred)."""
    config = vision(
        motion={"enabled": False},
        zones=[{"name": "plaza", "polygon": PLAZA}, {"name": "walkway", "polygon": RIGHT_WALKWAY}],
        rules=[
            {
                "name": "crowd",
                "type": "grouping",
                "zone": "plaza",
                "min_count": 9,
                "min_duration_s": 1.5,
                "hysteresis_s": 2,
                "cooldown_s": 5,
            },
            {"name": "walkway-intrusion", "type": "intrusion", "zone": "walkway", "hysteresis_s": 2, "cooldown_s": 5},
            {"name": "plaza-loitering", "type": "loitering", "zone": "plaza", "min_duration_s": 10, "hysteresis_s": 2},
        ],
    )
    return run(VisionPipeline(config, ssd), vtest_frames(limit=400))


def test_tracks_keep_their_ids_while_people_walk(ssd):
    tracker = ObjectTracker()
    ids_at = {}
    for frame in vtest_frames(limit=60):
        people = [d for d in ssd.detect(frame.rgb) if d.label == "person"]
        ids_at[frame.index] = {t.id: t.box for t in tracker.update(people, frame.timestamp)}
    early, late = ids_at[10], ids_at[50]
    kept = set(early) & set(late)
    assert len(early) >= 4 and len(kept) >= len(early) // 2
    moved = [tid for tid in kept if abs(early[tid][0] - late[tid][0]) + abs(early[tid][1] - late[tid][1]) > 0.02]
    assert moved, "the ids that survived belong to people who actually walked"


def test_grouping_raises_one_alert_per_situation_with_start_and_end(plaza_messages):
    messages = by_rule(plaza_messages, "crowd")
    situations = defaultdict(list)
    for m in messages:
        situations[m["body"]["situation_id"]].append((m["kind"], m["body"]["phase"]))
    complete = [s for s in situations.values() if s[0] == ("alert", "start") and s[-1] == ("event", "end")]
    assert complete, f"no grouping started and ended: {messages}"
    for phases in situations.values():
        assert phases[0] == ("alert", "start") and phases.count(("alert", "start")) == 1
        assert all(p == ("event", "update") for p in phases[1:-1])
    assert sum(m["kind"] == "alert" for m in messages) == len(situations)
    first = messages[0]["body"]
    assert first["count"] >= 9 and first["zone"] == "plaza" and len(first["objects"]) == first["count"]


def test_intrusion_zone_raises_alerts_when_people_enter_it(plaza_messages):
    alerts = [m for m in by_rule(plaza_messages, "walkway-intrusion") if m["kind"] == "alert"]
    assert alerts
    for alert in alerts:
        for obj in alert["body"]["objects"]:
            x1, _, x2, y2 = obj["box"]
            assert (x1 + x2) / 2 >= 0.5 and 0.25 <= y2 <= 0.8  # where they stand is in the walkway


def test_loitering_rule_fires(plaza_messages):
    (alert, *_) = [m for m in by_rule(plaza_messages, "plaza-loitering") if m["kind"] == "alert"]
    assert alert["body"]["dwell_s"] >= 10
    assert alert["body"]["model"] == "ssd-mobilenet-v1-coco-quant"
    assert set(alert["body"]) >= {
        "rule",
        "rule_type",
        "phase",
        "situation_id",
        "zone",
        "classes",
        "count",
        "track_ids",
        "objects",
        "camera",
    }


def test_bag_left_behind_raises_an_unattended_object_alert(ssd):
    """A person walks by and a suitcase stays where they were (frame 465 onwards), with motion gating on."""
    config = vision(
        detector={"min_score": 0.3},
        filters={"suitcase": {"min_score": 0.25, "median_score": 0.3}},
        # A 40x50-px bag in a crowd is seen only in zooms; gating's default budget (≤ 1.1x the cost of not gating)
        # allows a zoom now and then, so this camera buys a zoom on every busy tile each frame.
        motion={"enabled": True, "full_frame_every_s": 3, "zoom_budget": 4},
        rules=[
            {"name": "left-bag", "type": "unattended", "min_duration_s": 5, "person_distance": 1.0, "hysteresis_s": 3}
        ],
    )
    pipeline = VisionPipeline(config, ssd)
    sprite = suitcase_sprite(40, 50)
    frames = (paste(f, sprite, (0.514, 0.518)) if f.index >= 465 else f for f in vtest_frames(start=440, limit=200))
    alerts = [m for m in run(pipeline, frames) if m["kind"] == "alert"]
    assert len(alerts) == 1
    (obj,) = alerts[0]["body"]["objects"]
    assert obj["label"] in ("suitcase", "backpack", "handbag")
    assert abs((obj["box"][0] + obj["box"][2]) / 2 - 0.514) < 0.05 and abs(obj["box"][3] - 0.518) < 0.05
    assert alerts[0]["body"]["stationary_s"] >= 5
    assert pipeline.frames_skipped == 0  # people keep moving in this scene: every frame has motion


@pytest.mark.parametrize("spoil,reason", [(covered, "covered"), (smeared, "defocused")])
def test_covered_or_smeared_camera_raises_a_tamper_alert(ssd, spoil, reason):
    config = vision(rules=[{"name": "tamper", "type": "camera_tamper", "min_duration_s": 2, "hysteresis_s": 2}])
    pipeline = VisionPipeline(config, ssd)
    frames = (spoil(f) if 60 <= f.index < 110 else f for f in vtest_frames(limit=150))
    messages = run(pipeline, frames)
    assert [(m["kind"], m["body"]["phase"]) for m in messages] == [("alert", "start"), ("event", "end")]
    start, end = messages
    assert start["body"]["reason"] == reason
    assert start["body"]["situation_id"] == end["body"]["situation_id"]


def test_still_scene_is_skipped_by_motion_gating(ssd):
    frame = next(vtest_frames(limit=1))
    config = vision(motion={"enabled": True, "full_frame_every_s": 5})
    pipeline = VisionPipeline(config, ssd)
    for i in range(100):
        frame.timestamp = i / 10
        pipeline.process(frame)
    assert pipeline.frames_skipped >= 95  # only the periodic full-frame passes ran the model


def test_regions_are_cut_from_the_full_size_frame(ssd):
    """A camera with a small detection stream and a full-size one (picamera2's lores and main)."""
    from hw.camera import Frame

    frame = next(vtest_frames(limit=1))
    small = cv2.resize(frame.rgb, (384, 288), interpolation=cv2.INTER_AREA)
    dual = Frame(rgb=small, timestamp=0.0, index=0, full=frame.rgb)
    pipeline = VisionPipeline(vision(motion={"enabled": False}), ssd)
    from_full = pipeline.look(dual)
    from_small = VisionPipeline(vision(motion={"enabled": False}), ssd).look(Frame(rgb=small, timestamp=0.0, index=0))
    people = [d for d in from_full if d.label == "person"]
    assert len(people) >= len([d for d in from_small if d.label == "person"])
    assert people and all(0 <= d.box[0] < d.box[2] <= 1 for d in people)
    full_only = pipeline.look(Frame(rgb=frame.rgb, timestamp=0.0, index=0))
    assert [round(d.box[0], 2) for d in from_full] == [round(d.box[0], 2) for d in full_only]


def turned_away(frame):
    """Someone twists the camera: the view now shows another part of the scene (shifted and flipped)."""
    from hw.camera import Frame

    view = cv2.flip(frame.rgb, -1)
    return Frame(rgb=np.ascontiguousarray(view), timestamp=frame.timestamp, index=frame.index)


def test_camera_turned_away_raises_a_tamper_alert(ssd):
    config = vision(rules=[{"name": "tamper", "type": "camera_tamper", "min_duration_s": 2, "hysteresis_s": 2}])
    pipeline = VisionPipeline(config, ssd)
    frames = (turned_away(f) if f.index >= 60 else f for f in vtest_frames(limit=120))
    messages = run(pipeline, frames)
    (start,) = [m for m in messages if m["kind"] == "alert"]
    assert start["body"]["reason"] == "scene_changed"
