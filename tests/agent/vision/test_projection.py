"""360° cameras on real footage made into fisheye and panorama frames by a known projection.

The people are those the SSD model finds (score ≥ 0.5) on the original perspective frames of
vtest.avi, carried into the 360° frame by the same projection that made it.
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.config.vision import ProjectionSection, VisionConfig
from agent.vision.pipeline import VisionPipeline
from agent.vision.projection import Projection
from hw.camera import Frame
from tests.agent.vision.fisheye_scenes import (
    box_in_fisheye,
    box_in_panorama,
    fisheye_from_perspective,
    fisheye_recall,
    iou,
    matched,
    panorama_from_perspective,
)
from tests.agent.vision.scenes import vtest_frames

FISHEYE_SIZE = 1600
#: Five 60° views across a 180° wall-mounted fisheye, each overlapping its neighbours by half.
FIVE_VIEWS = [{"name": f"v{yaw}".replace("-", "m"), "yaw": yaw, "fov": 60} for yaw in (-60, -30, 0, 30, 60)]


def camera(projection: dict, **extra) -> VisionConfig:
    return VisionConfig.model_validate(
        {"camera": {"source": "fisheye.avi", "projection": projection}, "motion": {"enabled": False}, **extra}
    )


@pytest.fixture(scope="module")
def originals(ssd):
    """Five vtest frames and the people the model finds on each (score ≥ 0.5)."""
    frames = list(vtest_frames(limit=40))[::8]
    return [(f, [d.box for d in ssd.detect(f.rgb) if d.label == "person" and d.score >= 0.5]) for f in frames]


def test_the_geometry_agrees_with_an_independent_lens_model():
    projection = Projection(ProjectionSection(type="fisheye", views=FIVE_VIEWS))
    for index, view in enumerate(projection.views):
        (point,), seen = projection.view_to_source(index, np.array([[0.5, 0.5]]), 1.0)
        x1, y1, _, _ = box_in_fisheye((0.5, 0.5, 0.5, 0.5), 768, 576, view.yaw)
        assert seen[0] and point == pytest.approx((x1, y1), abs=1e-6)
    # An equidistant lens: 90° off the axis is the edge of a 180° lens circle.
    (edge,), seen = projection.rays_to_source(np.array([[1.0, 0.0, 0.0]]), 1.0)
    assert seen[0] and edge == pytest.approx((1.0, 0.5))
    (behind,), seen = projection.rays_to_source(np.array([[0.0, 0.0, -1.0]]), 1.0)
    assert not seen[0]


def test_a_ceiling_fisheye_puts_yaw_0_at_the_top_and_turns_clockwise():
    projection = Projection(ProjectionSection(type="fisheye", mount="ceiling"))
    assert [v.yaw for v in projection.views] == [0, 90, 180, 270]
    centres = [projection.view_to_source(i, np.array([[0.5, 0.5]]), 1.0)[0][0] for i in range(4)]
    assert centres[0][1] < 0.5 and centres[0][0] == pytest.approx(0.5)  # top
    assert centres[1][0] > 0.5 and centres[1][1] == pytest.approx(0.5)  # right
    assert centres[2][1] > 0.5 and centres[3][0] < 0.5


def recall(pipeline_or_detector, scenes, to_360, mapped) -> tuple[float, list[list]]:
    found = total = 0
    kept = []
    for frame, people in scenes:
        h, w = frame.rgb.shape[:2]
        image = to_360(frame.rgb)
        references = [mapped(b, w, h) for b in people]
        if isinstance(pipeline_or_detector, VisionPipeline):
            boxes = [d.box for d in pipeline_or_detector.look(Frame(rgb=image, timestamp=0.0, index=0))]
        else:
            boxes = [d.box for d in pipeline_or_detector.detect(image) if d.label == "person"]
        found += sum(matched(references, boxes))
        total += len(references)
        kept.append(boxes)
    return found / total, kept


def test_dewarped_views_find_the_people_the_raw_fisheye_loses(ssd):
    frames = list(vtest_frames(limit=50))[::10]
    # The scene 30°..90° off the axis, out to the rim, where a fisheye squeezes and bends people most.
    figures = fisheye_recall(ssd, frames, yaw=60.0, views=FIVE_VIEWS)
    assert figures["dewarped"] >= 0.85 and figures["dewarped"] >= figures["perspective"] - 0.1, figures
    assert figures["dewarped"] >= figures["raw"] + 0.4, figures


def test_people_on_a_seam_between_two_views_are_one_box_each(ssd, originals):
    yaw = 45.0  # the scene spans 15°..75°: half in the 30° view, half in the 60° view, and both overlap

    def to_360(rgb):
        return fisheye_from_perspective(rgb, 1600, yaw)

    def mapped(box, w, h):
        return box_in_fisheye(box, w, h, yaw)

    pipeline = VisionPipeline(camera({"type": "fisheye", "views": FIVE_VIEWS}), ssd)
    seen_twice = 0
    for frame, people in originals:
        image = to_360(frame.rgb)
        per_view = [pipeline.projection.detect(image, ssd, [i]) for i in (3, 4)]
        references = [mapped(b, 768, 576) for b in people]
        seen_twice += sum(
            a + b == 2 for a, b in zip(*(matched(references, [d.box for d in v]) for v in per_view), strict=True)
        )
        boxes = [d.box for d in pipeline.look(Frame(rgb=image, timestamp=0.0, index=0))]
        duplicates = [r for r in references if sum(iou(r, b) >= 0.3 for b in boxes) > 1 and len(references) == 1]
        assert not duplicates
        assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if iou(a, b) >= 0.5]
    assert seen_twice >= 5  # the test does cross the seam: these people were found by both views


def test_a_panorama_across_its_seam_keeps_its_people(ssd, originals):
    yaw = 180.0  # the scene spans 150°..210°: across the panorama's left/right edge

    def to_360(rgb):
        return panorama_from_perspective(rgb, 4096, yaw)

    def mapped(box, w, h):
        return box_in_panorama(box, w, h, yaw)

    scenes = [
        (f, [b for b in people if mapped(b, 768, 576)[2] - mapped(b, 768, 576)[0] < 0.5]) for f, people in originals
    ]
    views = [{"name": f"yaw{y}", "yaw": y, "fov": 60} for y in (150, 180, 210)]
    pipeline = VisionPipeline(camera({"type": "equirectangular", "views": views}), ssd)
    dewarped, _ = recall(pipeline, scenes[:3], to_360, mapped)
    raw, _ = recall(ssd, scenes[:3], to_360, mapped)
    assert dewarped >= 0.8 and dewarped > raw, (dewarped, raw)


SEAM_VIEWS = [{"name": "v30", "yaw": 30, "fov": 60}, {"name": "v60", "yaw": 60, "fov": 60}]


def overlapping_pairs(tracks) -> int:
    boxes = [t.box for t in tracks]
    return sum(iou(a, b) >= 0.5 for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_tracks_cross_the_seam_without_duplicates(ssd):
    """Three seconds of people walking across the seam of two views: no more tracks than on the original."""
    filters = {"person": {"min_score": 0.4}}  # the camera box's default detector threshold
    fisheye = VisionPipeline(camera({"type": "fisheye", "views": SEAM_VIEWS}, filters=filters), ssd)
    flat = VisionPipeline(
        VisionConfig.model_validate({"camera": {"source": "x.avi"}, "motion": {"enabled": False}, "filters": filters}),
        ssd,
    )
    ids, flat_ids = set(), set()
    pairs = flat_pairs = 0
    for frame in vtest_frames(limit=30):
        image = fisheye_from_perspective(frame.rgb, 1600, 45.0)
        fisheye.process(Frame(rgb=image, timestamp=frame.timestamp, index=frame.index))
        flat.process(frame)
        ids |= {t.id for t in fisheye.tracks}
        flat_ids |= {t.id for t in flat.tracks}
        pairs += overlapping_pairs(fisheye.tracks)
        flat_pairs += overlapping_pairs(flat.tracks)  # people walking side by side overlap on the original too
    assert len(ids) <= len(flat_ids) + 1, (len(ids), len(flat_ids))
    assert pairs <= flat_pairs, (pairs, flat_pairs)


def test_a_zone_drawn_on_a_view_raises_an_intrusion_and_one_elsewhere_does_not(ssd):
    whole = [[0.02, 0.02], [0.98, 0.02], [0.98, 0.98], [0.02, 0.98]]
    config = camera(
        {"type": "fisheye", "views": SEAM_VIEWS + [{"name": "ahead", "yaw": 0, "fov": 40}]},
        zones=[{"name": "path", "view": "v60", "polygon": whole}, {"name": "door", "view": "ahead", "polygon": whole}],
        rules=[
            {"name": "on-path", "type": "intrusion", "zone": "path"},
            {"name": "at-door", "type": "intrusion", "zone": "door"},
        ],
    )
    pipeline = VisionPipeline(config, ssd)
    alerts = []
    for frame in vtest_frames(limit=8):
        image = fisheye_from_perspective(frame.rgb, 1600, 60.0)
        alerts += pipeline.process(Frame(rgb=image, timestamp=frame.timestamp, index=frame.index))
    assert [m["body"]["rule"] for m in alerts if m["kind"] == "alert"] == ["on-path"]
    door = pipeline.rules.zones["door"].polygon  # the view straight ahead, redrawn on the fisheye's centre
    assert all(abs(x - 0.5) < 0.15 and abs(y - 0.5) < 0.15 for x, y in door)


def test_motion_gating_runs_only_the_views_that_see_something(ssd):
    config = camera({"type": "fisheye", "views": FIVE_VIEWS})
    gated = VisionPipeline(
        config.model_copy(update={"motion": config.motion.model_copy(update={"enabled": True})}), ssd
    )
    frames = [
        Frame(rgb=fisheye_from_perspective(f.rgb, 1600, 60.0), timestamp=f.timestamp, index=f.index)
        for f in vtest_frames(limit=3)
    ]
    assert gated.look(frames[0]) is not None  # the first frame is a full pass: every view
    still = Frame(rgb=frames[0].rgb, timestamp=0.2, index=1)
    assert gated.look(still) is None  # nothing moved, no view run
    moved = [gated.projection.views[i].name for i in gated.projection.views_seeing([(0.85, 0.4, 0.9, 0.5)], 1.0)]
    assert moved == ["v30", "v60"]  # a box 60°..70° right of the axis: only the views that see it


def test_each_object_is_reported_once_by_the_view_that_owns_it():
    from agent.vision.decoders import Detection
    from agent.vision.projection import merge_across_views

    def person(x1, score=0.8):
        return Detection("person", 0, score, (x1, 0.4, x1 + 0.04, 0.5))

    found = [
        (0, person(0.50), True),
        (1, person(0.505, 0.9), False),  # the same person, seen by a view that does not own it: dropped
        (1, person(0.70), True),
        (0, person(0.702), False),
        (0, person(0.52), True),  # a second person beside the first, same view: kept (the detector's NMS decides)
        (1, person(0.90), False),  # only the non-owning view saw this one: kept
        (2, person(0.301), True),  # a centre right on the border, owned by both views: one is kept
        (3, person(0.30, 0.7), True),
    ]
    kept = merge_across_views(found)
    assert sorted(round(d.box[0], 3) for d in kept) == [0.301, 0.5, 0.52, 0.7, 0.9]


def test_a_ceiling_fisheye_shows_people_upright_in_its_views(ssd, originals):
    """Looking down, a fisheye shows people lying on their side, heads to the centre: the model finds
    none of them on the raw frame; a view looking 40° down towards them shows them upright."""
    views = [{"name": "east", "yaw": 90, "pitch": -40, "fov": 60}]
    pipeline = VisionPipeline(camera({"type": "fisheye", "mount": "ceiling", "views": views}), ssd)
    found = raw = total = 0
    for frame, people in originals:
        image = fisheye_from_perspective(frame.rgb, 2400, 90.0, pitch=-40.0, ceiling=True)
        references = [box_in_fisheye(b, 768, 576, 90.0, pitch=-40.0, ceiling=True) for b in people]
        found += sum(matched(references, [d.box for d in pipeline.look(Frame(rgb=image, timestamp=0.0, index=0))]))
        raw += sum(matched(references, [d.box for d in ssd.detect(image) if d.label == "person"]))
        total += len(references)
    assert found / total >= 0.75 and raw / total <= 0.2, (found / total, raw / total)
