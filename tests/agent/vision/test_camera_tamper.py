"""Camera tamper on the real plaza footage made into each case: part of the lens covered or sprayed, moderate
blinding, defocus, and the lights going off (a lighting change, never a tamper alert)."""

import cv2
import numpy as np
import pytest

from agent.config.vision import VisionConfig
from agent.vision.camera_tamper import CameraTamperDetector
from agent.vision.pipeline import VisionPipeline
from hw.camera import Frame
from tests.agent.vision.scenes import vtest_frames

TAMPER = {"name": "tamper", "type": "camera_tamper", "min_duration_s": 2, "hysteresis_s": 2}


def spoilt(frame: Frame, rgb: np.ndarray) -> Frame:
    return Frame(rgb=np.ascontiguousarray(rgb), timestamp=frame.timestamp, index=frame.index)


def partly_covered(frame: Frame) -> Frame:
    """A hand or a sheet over the left 60 % of the lens."""
    rgb = frame.rgb.copy()
    rgb[:, : int(rgb.shape[1] * 0.6)] = (40, 30, 25)
    return spoilt(frame, rgb)


def partly_sprayed(frame: Frame) -> Frame:
    """Paint sprayed over the top 60 % of the lens: that part keeps its colours, not its detail."""
    rgb = frame.rgb.copy()
    top = int(rgb.shape[0] * 0.6)
    rgb[:top] = cv2.GaussianBlur(rgb[:top], (0, 0), sigmaX=12)
    return spoilt(frame, rgb)


def overexposed(frame: Frame, mean: float = 224.0) -> Frame:
    """A torch into the lens: gain until the grey mean is ``mean`` (moderate: under the absolute 235)."""
    low, high = 1.0, 8.0
    for _ in range(25):
        gain = (low + high) / 2
        grey = cv2.cvtColor(np.clip(frame.rgb * np.float32(gain), 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
        low, high = (gain, high) if grey.mean() < mean else (low, gain)
    return spoilt(frame, np.clip(frame.rgb * np.float32(gain), 0, 255).astype(np.uint8))


def defocused(frame: Frame) -> Frame:
    """The lens turned out of focus."""
    return spoilt(frame, cv2.GaussianBlur(frame.rgb, (0, 0), sigmaX=3))


def lights_off(frame: Frame, light: float = 0.2) -> Frame:
    """The plaza's lights go off: every value scales down, nothing else changes."""
    return spoilt(frame, (frame.rgb * np.float32(light)).astype(np.uint8))


def run_pipeline(detector, spoil, start: int = 60, stop: int = 110, limit: int = 150) -> list[dict]:
    config = VisionConfig.model_validate({"camera": {"source": "vtest.avi", "name": "plaza"}, "rules": [TAMPER]})
    pipeline = VisionPipeline(config, detector)
    frames = (spoil(f) if start <= f.index < stop else f for f in vtest_frames(limit=limit))
    return [message for frame in frames for message in pipeline.process(frame)]


@pytest.mark.parametrize(
    "spoil,reason",
    [(partly_covered, "covered"), (partly_sprayed, "covered"), (overexposed, "blinded"), (defocused, "defocused")],
)
def test_each_kind_of_tamper_raises_one_alert_with_its_reason(ssd, spoil, reason):
    messages = run_pipeline(ssd, spoil)
    assert [(m["kind"], m["body"]["phase"]) for m in messages] == [("alert", "start"), ("event", "end")]
    start, end = messages
    assert start["body"]["reason"] == reason
    assert start["body"]["rule_type"] == "camera_tamper"
    assert start["body"]["situation_id"] == end["body"]["situation_id"]


def test_lights_going_off_and_on_are_two_lighting_events_and_no_tamper_alert(ssd):
    messages = run_pipeline(ssd, lights_off)
    assert [m["kind"] for m in messages] == ["event", "event"]
    assert [(m["body"]["rule_type"], m["body"]["phase"], m["body"]["lights"]) for m in messages] == [
        ("lights_changed", "notice", "darker"),
        ("lights_changed", "notice", "brighter"),
    ]
    darker = messages[0]["body"]
    assert darker["brightness"] < darker["brightness_baseline"] / 1.5
    assert darker["focus"] >= 0.8 * darker["focus_baseline"]  # the contrast-normalised focus did not move


def test_normal_footage_is_never_tamper_and_never_a_lighting_change():
    detector = CameraTamperDetector()
    looks = [detector.check(f.rgb) for f in vtest_frames() if f.index % 3 == 0]  # ~3 looks a second, 80 s
    assert [look.reason for look in looks if look.reason] == []
    assert [look.lights_changed for look in looks if look.lights_changed] == []


def test_a_dark_scene_is_covered_only_when_the_scene_is_gone():
    """Lights off down to a mean under ``dark`` keep the scene (similarity); a lens cap does not."""
    detector = CameraTamperDetector()
    frames = list(vtest_frames(limit=90))
    for frame in frames[:60]:
        detector.check(frame.rgb)
    dark = detector.check(lights_off(frames[60], light=0.1).rgb)
    assert dark.metrics["brightness"] < detector.dark and dark.reason is None and dark.lights_changed == "darker"
    cap = np.random.default_rng(0).integers(0, 6, frames[61].rgb.shape, dtype=np.uint8)
    assert detector.check(cap).reason == "covered"
