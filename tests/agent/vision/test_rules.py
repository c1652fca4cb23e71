"""Rules over tracks: one situation raises one start, its updates and one end; zones, schedules, distances."""

import datetime as dt

import pytest

from agent.config.vision import RuleSection, ZoneSection
from agent.vision.rules import RuleEngine, Situation, point_in_polygon
from agent.vision.tracking import Track

SQUARE = [(0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (0.0, 1.0)]


def person(track_id, x=0.25, y=0.9, h=0.2, label="person", t=0.0):
    return Track(track_id, label, (x - 0.03, y - h, x + 0.03, y), first_seen=t, last_seen=t)


def rule(**settings):
    return RuleSection(**{"name": "r", "hysteresis_s": 2.0, "cooldown_s": 10.0, **settings})


def run(engine, timeline):
    """timeline: list of (time, tracks); returns (time, phase) of every event."""
    return [(t, e.phase) for t, tracks in timeline for e in engine.evaluate(tracks, t)]


def test_point_in_polygon():
    assert point_in_polygon((0.25, 0.75), SQUARE)
    assert not point_in_polygon((0.75, 0.75), SQUARE)


def test_situation_lifecycle_start_update_end_and_cooldown():
    situation = Situation(rule(type="grouping", min_duration_s=3.0, update_every_s=5.0))
    phases = []
    for t in range(0, 40):
        condition = 0 <= t < 20 or t >= 25
        details = {"count": 3 + (t // 7), "track_ids": [1, 2, 3]}
        event = situation.step(condition, details, float(t))
        if event:
            phases.append((t, event.phase, event.event_id))
    assert [(t, p) for t, p, _ in phases] == [(3, "start"), (8, "update"), (14, "update"), (22, "end"), (35, "start")]
    first_id = phases[0][2]
    assert all(e == first_id for _, _, e in phases[:4]) and phases[4][2] != first_id


def test_short_gap_inside_hysteresis_keeps_one_situation():
    situation = Situation(rule(type="intrusion"))
    events = [situation.step(t not in (5, 6), {"count": 1}, float(t)) for t in range(10)]
    assert [e.phase for e in events if e] == ["start"]


def test_intrusion_needs_the_zone_with_inertia_and_the_schedule():
    zone = ZoneSection(name="yard", polygon=SQUARE, inertia=3)
    night = RuleEngine(
        [zone],
        [rule(type="intrusion", zone="yard", schedule=["22:00-06:00"])],
        wall_clock=lambda: dt.datetime(2026, 11, 24, 23, 30),
    )
    timeline = [
        (0.0, [person(1, x=0.8)]),
        (1.0, [person(1, x=0.3)]),
        (2.0, [person(1, x=0.3)]),
        (3.0, [person(1, x=0.3)]),
        (4.0, []),
        (7.0, []),
    ]
    assert run(night, timeline) == [(3.0, "start"), (7.0, "end")]
    day = RuleEngine(
        [zone],
        [rule(type="intrusion", zone="yard", schedule=["22:00-06:00"])],
        wall_clock=lambda: dt.datetime(2026, 11, 24, 12, 0),
    )
    assert run(day, timeline) == []


def test_grouping_counts_persons_or_people_close_together():
    crowd = [person(i, x=0.1 + 0.02 * i) for i in range(4)]
    spread = [person(i, x=0.1 + 0.25 * i) for i in range(4)]
    count_rule = RuleEngine([], [rule(type="grouping", min_count=4, min_duration_s=2)])
    assert run(count_rule, [(t, spread) for t in (0.0, 1.0, 2.0)]) == [(2.0, "start")]
    distance_rule = RuleEngine([], [rule(type="grouping", min_count=4, max_distance=1.0, min_duration_s=0)])
    assert run(distance_rule, [(0.0, spread)]) == []
    assert run(distance_rule, [(1.0, crowd)]) == [(1.0, "start")]


def test_loitering_fires_after_the_dwell_time_in_the_zone():
    zone = ZoneSection(name="gate", polygon=SQUARE, inertia=1)
    engine = RuleEngine([zone], [rule(type="loitering", zone="gate", min_duration_s=30)])
    timeline = [(float(t), [person(7)]) for t in range(0, 40, 5)]
    assert run(engine, timeline) == [(30.0, "start")]


def test_unattended_object_needs_stillness_and_nobody_near():
    bag = Track(9, "suitcase", (0.40, 0.80, 0.44, 0.86), first_seen=0.0, last_seen=0.0)
    bag.anchor, bag.anchor_time = (0.42, 0.83), 0.0
    engine = RuleEngine([], [rule(type="unattended", min_duration_s=20, person_distance=2.0)])
    owner_near = person(1, x=0.45, y=0.86)
    owner_far = person(1, x=0.95, y=0.86)
    assert run(engine, [(10.0, [bag, owner_far]), (25.0, [bag, owner_near])]) == []
    assert run(engine, [(30.0, [bag, owner_far])]) == [(30.0, "start")]


def test_rules_that_need_a_duration_refuse_none():
    with pytest.raises(ValueError, match="a loitering rule needs min_duration_s"):
        RuleSection(name="l", type="loitering")
    assert RuleSection(name="u", type="unattended", min_duration_s=5).watched_classes == [
        "backpack",
        "handbag",
        "suitcase",
    ]


def test_zone_filters_keep_small_or_doubtful_objects_out_of_a_zone():
    zone = ZoneSection(
        name="yard", polygon=SQUARE, inertia=1, filters={"person": {"median_score": 0.6, "min_area": 0.005}}
    )
    engine = RuleEngine([zone], [rule(type="intrusion", zone="yard")])
    doubtful = person(1)
    doubtful.scores.extend([0.4, 0.5, 0.45])
    tiny = Track(2, "person", (0.20, 0.88, 0.21, 0.90), first_seen=0.0, last_seen=0.0)
    tiny.scores.extend([0.9, 0.9])
    assert run(engine, [(0.0, [doubtful, tiny])]) == []
    confident = person(3)
    confident.scores.extend([0.7, 0.8, 0.75])
    assert run(engine, [(1.0, [doubtful, tiny, confident])]) == [(1.0, "start")]
