"""Zones and rules: turn tracks into situations with a start, updates and an end.

A *situation* is one rule's condition over time. It starts once the condition
has held ``min_duration_s``, ends once it has been gone ``hysteresis_s``, and
cannot start again for ``cooldown_s``: one grouping on the plaza raises one
alert, not one per frame. Each situation has a stable event id.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config.vision import FilterSection, RuleSection, ZoneSection
from agent.vision.tracking import Track


def point_in_polygon(point: tuple[float, float], polygon: list[tuple[float, float]]) -> bool:
    """Even-odd ray casting; points are normalised image coordinates."""
    x, y = point
    inside = False
    j = len(polygon) - 1
    for i, (xi, yi) in enumerate(polygon):
        xj, yj = polygon[j]
        if (yi > y) != (yj > y) and x < (xj - xi) * (y - yi) / (yj - yi) + xi:
            inside = not inside
        j = i
    return inside


def passes(track: Track, filters: dict[str, FilterSection]) -> bool:
    """A track meets its class's filter: median score over its history, and box area."""
    rule = filters.get(track.label)
    if rule is None:
        return True
    x1, y1, x2, y2 = track.box
    return track.median_score >= rule.median_score and rule.min_area <= (x2 - x1) * (y2 - y1) <= rule.max_area


class Zone:
    """A polygon with inertia: an object counts as inside after ``inertia`` consecutive frames in it."""

    def __init__(self, settings: ZoneSection):
        self.name = settings.name
        self.polygon = settings.polygon
        self.inertia = settings.inertia
        self.filters = settings.filters
        self._streak: dict[int, int] = {}
        self.entered_at: dict[int, float] = {}

    def update(self, tracks: list[Track], now: float) -> None:
        live = {t.id for t in tracks}
        for track in tracks:
            if point_in_polygon(track.bottom_centre, self.polygon) and passes(track, self.filters):
                self._streak[track.id] = self._streak.get(track.id, 0) + 1
                if self._streak[track.id] >= self.inertia:
                    self.entered_at.setdefault(track.id, now)
            else:
                self._streak.pop(track.id, None)
                self.entered_at.pop(track.id, None)
        for gone in set(self._streak) - live:
            self._streak.pop(gone, None)
            self.entered_at.pop(gone, None)

    def contains(self, track: Track) -> bool:
        return track.id in self.entered_at


@dataclass
class RuleEvent:
    rule: str
    rule_type: str
    phase: str  # start / update / end
    event_id: str
    at: float
    details: dict[str, Any] = field(default_factory=dict)


class Situation:
    """The start/update/end lifecycle of one rule's condition."""

    def __init__(self, rule: RuleSection, min_duration_s: float | None = None):
        self.rule = rule
        self.min_duration_s = rule.min_duration_s if min_duration_s is None else min_duration_s
        self.event_id: str | None = None
        self._true_since: float | None = None
        self._false_since: float | None = None
        self._cooldown_until = -math.inf
        self._last_update = 0.0
        self._last_signature: Any = None

    @property
    def active(self) -> bool:
        return self.event_id is not None

    def step(self, condition: bool, details: dict[str, Any], now: float) -> RuleEvent | None:
        rule = self.rule
        if self.event_id is None:
            if not condition or now < self._cooldown_until:
                self._true_since = None
                return None
            if self._true_since is None:
                self._true_since = now
            if now - self._true_since < self.min_duration_s:
                return None
            self.event_id, self._false_since = str(uuid.uuid4()), None
            self._last_update, self._last_signature = now, _signature(details)
            return self._event("start", now, details)
        if condition:
            self._false_since = None
            signature = _signature(details)
            if signature != self._last_signature and now - self._last_update >= rule.update_every_s:
                self._last_update, self._last_signature = now, signature
                return self._event("update", now, details)
            return None
        if self._false_since is None:
            self._false_since = now
        if now - self._false_since < rule.hysteresis_s:
            return None
        event = self._event("end", now, details)
        self.event_id, self._true_since = None, None
        self._cooldown_until = now + rule.cooldown_s
        return event

    def _event(self, phase: str, now: float, details: dict[str, Any]) -> RuleEvent:
        return RuleEvent(self.rule.name, self.rule.type, phase, self.event_id or "", now, details)


def _signature(details: dict[str, Any]) -> Any:
    return (details.get("count"), tuple(sorted(details.get("track_ids", []))))


def _in_schedule(windows: list[str], clock: Callable[[], dt.datetime]) -> bool:
    if not windows:
        return True
    now = clock().time()
    for window in windows:
        start, end = (dt.time.fromisoformat(part) for part in window.split("-"))
        if (start <= now < end) if start <= end else (now >= start or now < end):
            return True
    return False


class RuleEngine:
    """Evaluates every configured rule on each processed frame."""

    def __init__(
        self,
        zones: list[ZoneSection],
        rules: list[RuleSection],
        wall_clock: Callable[[], dt.datetime] = dt.datetime.now,
    ):
        self.zones = {z.name: Zone(z) for z in zones}
        self.rules = [r for r in rules if r.type != "camera_tamper"]
        # Loitering and unattended rules measure their duration in the condition itself (dwell, stillness).
        self.situations = {r.name: Situation(r, 0.0 if r.type in ("loitering", "unattended") else None) for r in rules}
        self.wall_clock = wall_clock

    def evaluate(self, tracks: list[Track], now: float) -> list[RuleEvent]:
        for zone in self.zones.values():
            zone.update(tracks, now)
        events = []
        for rule in self.rules:
            condition, subjects, extra = self._condition(rule, tracks, now)
            details = {"zone": rule.zone, "count": len(subjects), "track_ids": [t.id for t in subjects], **extra}
            event = self.situations[rule.name].step(condition, details, now)
            if event is not None:
                # The full description is built only when something is reported, not on every frame.
                event.details.update(
                    classes=sorted({t.label for t in subjects}), objects=[t.as_dict() for t in subjects]
                )
                events.append(event)
        return events

    def _candidates(self, rule: RuleSection, tracks: list[Track]) -> list[Track]:
        zone = self.zones.get(rule.zone) if rule.zone else None
        classes = set(rule.watched_classes)
        return [t for t in tracks if t.label in classes and (zone is None or zone.contains(t))]

    def _condition(self, rule: RuleSection, tracks: list[Track], now: float) -> tuple[bool, list[Track], dict]:
        candidates = self._candidates(rule, tracks)
        if rule.type == "intrusion":
            return bool(candidates) and _in_schedule(rule.schedule, self.wall_clock), candidates, {}
        if rule.type == "grouping":
            group = _largest_group(candidates, rule.max_distance) if rule.max_distance else candidates
            return len(group) >= rule.min_count, group, {"min_count": rule.min_count}
        if rule.type == "loitering":
            zone = self.zones.get(rule.zone) if rule.zone else None
            since = (lambda t: zone.entered_at[t.id]) if zone else (lambda t: t.first_seen)
            loiterers = [t for t in candidates if now - since(t) >= rule.min_duration_s]
            return (
                bool(loiterers),
                loiterers,
                {"dwell_s": round(max((now - since(t) for t in loiterers), default=0), 1)},
            )
        if rule.type == "unattended":
            persons = [t for t in tracks if t.label == "person"]
            left = [
                t
                for t in candidates
                if t.stationary_for(now) >= rule.min_duration_s and not _anyone_near(t, persons, rule.person_distance)
            ]
            return bool(left), left, {"stationary_s": round(max((t.stationary_for(now) for t in left), default=0), 1)}
        raise ValueError(f"rule {rule.name!r}: unknown type {rule.type!r}")


def _largest_group(persons: list[Track], max_heights: float) -> list[Track]:
    """Persons linked by being within ``max_heights`` person-heights of each other (connected components)."""
    groups: list[list[Track]] = []
    unvisited = list(persons)
    while unvisited:
        group = [unvisited.pop()]
        frontier = list(group)
        while frontier:
            current = frontier.pop()
            near = [p for p in unvisited if _distance_in_heights(current, p) <= max_heights]
            for p in near:
                unvisited.remove(p)
            group += near
            frontier += near
        groups.append(group)
    return max(groups, key=len, default=[])


def _distance_in_heights(a: Track, b: Track) -> float:
    (ax, ay), (bx, by) = a.bottom_centre, b.bottom_centre
    height = max((a.box[3] - a.box[1] + b.box[3] - b.box[1]) / 2, 1e-3)
    return math.hypot(ax - bx, ay - by) / height


def _anyone_near(item: Track, persons: list[Track], sizes: float) -> bool:
    (ix, iy), reach = item.bottom_centre, sizes * max(item.size, 0.02)
    return any(math.hypot(px - ix, py - iy) <= reach for px, py in (p.bottom_centre for p in persons))
