"""Motion gating on the real plaza footage: never dearer than not gating, small objects still zoomed on where the
budget allows, and privacy-mask and ignore areas that neither move nor detect. Cost is counted in model runs
(each region costs one run); CPU timings are in bench/pipeline.py."""

import pytest

from agent.config.vision import VisionConfig
from agent.vision.motion import MotionDetector, RegionPlanner, shrink_grey
from agent.vision.pipeline import VisionPipeline
from hw.camera import Frame
from tests.agent.vision.scenes import vtest_frames

LEFT_HALF = [[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]]


def vision(**settings) -> VisionConfig:
    return VisionConfig.model_validate({"camera": {"source": "vtest.avi", "name": "plaza"}, **settings})


def runs_per_frame(pipeline, frames) -> float:
    for frame in frames:
        pipeline.process(frame)
    return pipeline.planner.runs / pipeline.planner.frames


def test_motion_is_judged_on_a_small_frame():
    frame = next(vtest_frames(limit=1))
    assert shrink_grey(frame.rgb).shape == shrink_grey(frame.rgb, exact=False).shape == (144, 192)  # 768x576 / 4


def test_a_still_scene_runs_the_model_only_on_the_periodic_full_pass(ssd):
    still = next(vtest_frames(limit=1)).rgb
    pipeline = VisionPipeline(vision(motion={"full_frame_every_s": 5}), ssd)
    frames = [Frame(rgb=still, timestamp=i / 10, index=i) for i in range(200)]
    full_passes, zooms_allowed = 4, 200 * pipeline.planner.zoom_budget  # full passes at 0, 5, 10 and 15 s
    assert full_passes / 200 <= runs_per_frame(pipeline, frames) <= (full_passes + zooms_allowed) / 200


def test_a_busy_scene_costs_at_most_one_full_pass_plus_the_zoom_budget(ssd):
    pipeline = VisionPipeline(vision(motion={"zoom_budget": 0.03}), ssd)
    frames = list(vtest_frames(limit=200))
    assert 1.0 <= runs_per_frame(pipeline, frames) <= 1.03 + 1 / 200  # +1: the budget's first whole token
    assert pipeline.frames_skipped == 0


def test_zooms_go_to_small_objects_as_the_budget_allows():
    """Two far-apart small people: full frame plus one zoom a frame at budget 1, every few frames at 0.25."""
    people = [(0.05, 0.1, 0.08, 0.18), (0.9, 0.8, 0.93, 0.9)]
    generous, thrifty = RegionPlanner(300, zoom_budget=1.0), RegionPlanner(300, zoom_budget=0.25)
    plans = [generous.plan(people, 768, 576) for _ in range(8)]
    assert all(len(plan) == 2 and plan[0] == (0, 0, 768, 576) for plan in plans)
    zoomed = {plan[1] for plan in plans}
    assert zoomed == {(0, 0, 300, 300), (468, 276, 300, 300)}  # fixed tiles, taking turns
    assert sum(len(thrifty.plan(people, 768, 576)) - 1 for _ in range(40)) == 10


def test_one_small_region_is_run_alone_and_a_large_object_is_left_to_the_full_frame():
    planner = RegionPlanner(300, zoom_budget=1.0)
    assert planner.plan([(0.45, 0.45, 0.5, 0.55)], 768, 576) == [(214, 138, 300, 300)]  # centred on it
    crowd = [(0.0, 0.0, 0.6, 0.9), (0.85, 0.1, 0.9, 0.2)]
    assert planner.plan(crowd, 768, 576) == [(0, 0, 768, 576), (468, 0, 300, 300)]


def test_ignored_and_masked_areas_never_count_as_motion():
    frames = list(vtest_frames(limit=60))
    plain, masked = MotionDetector(), MotionDetector(excluded=[LEFT_HALF])
    everywhere = [box for f in frames for box in plain.detect(f.rgb)]
    right_only = [box for f in frames for box in masked.detect(f.rgb)]
    assert any(box[2] < 0.45 for box in everywhere)  # people do walk on the left
    assert right_only and all(box[0] >= 0.45 for box in right_only)  # dilation may reach a little over


@pytest.mark.parametrize("area", ["privacy_masks", "ignore_areas"])
def test_nothing_standing_in_a_masked_or_ignored_area_is_detected(ssd, area):
    frames = list(vtest_frames(limit=30))
    everywhere = VisionPipeline(vision(motion={"enabled": False}), ssd)
    left_out = VisionPipeline(vision(motion={"enabled": False}, **{area: [{"polygon": LEFT_HALF}]}), ssd)
    seen = [d for f in frames for d in everywhere.look(f)]
    kept = [d for f in frames for d in left_out.look(f)]
    assert any((d.box[0] + d.box[2]) / 2 < 0.5 for d in seen)
    assert kept and all((d.box[0] + d.box[2]) / 2 >= 0.5 for d in kept)


def test_the_overlapped_stages_see_what_one_thread_sees_and_pass_on_a_lost_camera(ssd):
    from agent.vision.pipeline import OverlappedRun
    from hw.camera import CameraUnavailable

    frames = list(vtest_frames(limit=30))
    alone = VisionPipeline(vision(motion={"enabled": False}), ssd)
    for frame in frames:
        alone.process(frame)
    staged = VisionPipeline(vision(motion={"enabled": False}), ssd)
    source = iter(frames)
    run = OverlappedRun(staged, lambda: next(source, None))
    assert sum(1 for _ in run) == 30 and staged.frames == 30
    run.close()
    assert [t.box for t in staged.tracks] == [t.box for t in alone.tracks]  # ids are numbered process-wide

    def lost():
        raise CameraUnavailable("camera source plaza: no frame for 5 s")

    run = OverlappedRun(VisionPipeline(vision(), ssd), lost)
    with pytest.raises(CameraUnavailable, match="no frame for 5 s"):
        list(run)
    run.close()
