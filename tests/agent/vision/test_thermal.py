"""Thermal cameras on synthetic Y16 frames built from real footage with a known temperature mapping.

No thermal camera was available: each vtest frame becomes a radiometric frame (hundredths of a
kelvin, as a Lepton in TLinear mode sends) where the moving people (pixels that differ from the
scene's median background, inside the boxes the SSD model finds on the original) are 28–37 °C and
everything else 10–22 °C, both following the frame's own brightness so the texture is kept.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from agent.config.vision import ThermalSection, VisionConfig
from agent.vision.pipeline import VisionPipeline
from agent.vision.thermal import ThermalImage
from hw.camera import Frame
from tests.agent.vision.fisheye_scenes import matched
from tests.agent.vision.scenes import vtest_frames

RADIOMETRIC = {"normalise": "fixed", "range_c": [5, 40]}


def y16(temperatures_c: np.ndarray) -> np.ndarray:
    return np.round((temperatures_c + 273.15) * 100).astype(np.uint16)


@pytest.fixture(scope="module")
def scenes(ssd):
    """(frame, people boxes, warm-people Y16, people-at-room-temperature Y16) for five vtest frames."""
    frames = list(vtest_frames(limit=60))
    grey = [cv2.cvtColor(f.rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) for f in frames]
    background = np.median(np.stack(grey[::6]), axis=0)
    made = []
    for frame, g in list(zip(frames, grey, strict=True))[5::12]:
        people = [d.box for d in ssd.detect(frame.rgb) if d.label == "person" and d.score >= 0.5]
        h, w = g.shape
        body = np.zeros_like(g, dtype=bool)
        for x1, y1, x2, y2 in people:
            box = (slice(int(y1 * h), int(y2 * h) + 1), slice(int(x1 * w), int(x2 * w) + 1))
            body[box] |= np.abs(g[box] - background[box]) > 20
        scene = 10 + g / 255 * 12
        warm = np.where(body, 28 + g / 255 * 9, scene)
        made.append((frame, people, y16(warm), y16(scene)))
    return made


def thermal_config(**thermal) -> VisionConfig:
    return VisionConfig.model_validate(
        {"camera": {"source": "/dev/video0", "thermal": thermal}, "motion": {"enabled": False}}
    )


def look(pipeline: VisionPipeline, raw: np.ndarray):
    frame = Frame(rgb=cv2.cvtColor((raw >> 8).astype(np.uint8), cv2.COLOR_GRAY2RGB), timestamp=0.0, index=0, raw=raw)
    return [d.box for d in pipeline.look(frame) if d.label == "person"]


def test_counts_are_temperatures_and_a_fixed_range_is_the_same_grey_every_frame():
    thermal = ThermalImage(ThermalSection(normalise="fixed", range_c=[0, 40]))
    raw = y16(np.array([[0.0, 20.0, 36.5, 45.0]]))
    np.testing.assert_allclose(thermal.temperatures(raw), [[0.0, 20.0, 36.5, 45.0]], atol=0.01)
    assert thermal.to_rgb(raw)[0, :, 0].tolist() == [0, 127, 232, 255]
    assert thermal.to_rgb(raw).shape == (1, 4, 3)


def test_a_percentile_stretch_spreads_each_frame(scenes):
    thermal = ThermalImage(ThermalSection(radiometric=False, body_c=None))
    grey = thermal.to_rgb(scenes[0][2])[..., 0]
    assert 0.005 <= np.mean(grey == 0) <= 0.03 and 0.005 <= np.mean(grey == 255) <= 0.03


def test_the_detector_finds_warm_people_and_the_body_band_drops_people_at_room_temperature(ssd, scenes):
    gated = VisionPipeline(thermal_config(**RADIOMETRIC, body_c=[28, 40]), ssd)
    ungated = VisionPipeline(thermal_config(**RADIOMETRIC, body_c=None), ssd)
    total = warm_found = warm_ungated = cold_seen = cold_kept = 0
    for _, people, warm, cold in scenes:
        warm_found += sum(matched(people, look(gated, warm)))
        warm_ungated += sum(matched(people, look(ungated, warm)))
        cold_seen += len(look(ungated, cold))
        cold_kept += len(look(gated, cold))
        total += len(people)
    # A COCO model trained on colour photographs finds only some people on a thermal picture (about a
    # quarter here); the band must not cost any of them.
    assert warm_found >= 5 and warm_found == warm_ungated, f"{warm_found} (ungated {warm_ungated}) of {total}"
    assert cold_seen > 0  # the model does see person shapes at room temperature (a poster, a reflection) ...
    assert cold_kept == 0  # ... and the body-temperature band drops every one of them
    assert gated.thermal.rejected >= cold_seen


def test_thermal_settings_are_checked():
    with pytest.raises(ValidationError, match="normalise = 'fixed' needs radiometric frames"):
        ThermalSection(radiometric=False, normalise="fixed")
    with pytest.raises(ValidationError, match="body_c needs radiometric frames"):
        ThermalSection(radiometric=False, body_c=[28, 40])
    with pytest.raises(ValidationError, match=r"range_c must be \[low, high\] with low < high"):
        ThermalSection(range_c=[30, 20])
    with pytest.raises(ValidationError, match="a thermal camera is a UVC .V4L2. device or a Y16 recording"):
        thermal_config(radiometric=True).model_validate({"camera": {"source": "picamera2", "thermal": {}}})


def write_y16_video(path, frames: list[np.ndarray]) -> None:
    """A lossless 16-bit grey recording (FFV1), as a thermal camera's Y16 stream would be kept."""
    h, w = frames[0].shape
    params = [cv2.VIDEOWRITER_PROP_DEPTH, cv2.CV_16U, cv2.VIDEOWRITER_PROP_IS_COLOR, 0]
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 10, (w, h), params)
    assert writer.isOpened(), "this OpenCV cannot write 16-bit FFV1"
    for frame in frames:
        writer.write(frame)
    writer.release()


def test_a_y16_recording_keeps_its_temperatures_through_the_camera_and_detect(
    scenes, site, tmp_path, capsys, model_dir_with_faces
):
    from agent.cli import main
    from hw.camera_opencv import OpenCVCamera

    warm = [s[2] for s in scenes]
    video = tmp_path / "thermal.mkv"
    write_y16_video(video, warm)
    with OpenCVCamera(str(video), y16=True) as camera:
        first = camera.read()
    assert first.raw.dtype == np.uint16 and np.array_equal(first.raw, warm[0])  # every count, as recorded
    assert first.rgb.shape == (*warm[0].shape, 3) and first.rgb.dtype == np.uint8

    body = (
        f'[camera]\nsource = "{video}"\n[camera.thermal]\nnormalise = "fixed"\nrange_c = [5.0, 40.0]\n'
        f'[detector]\nmodel_dir = "{model_dir_with_faces}"\nmin_score = 0.3\n'
    )
    site.add_device("cam-heat", kind="camera-box", body=body)
    config = str(site.device_config_path("cam-heat"))
    out = tmp_path / "heat.png"
    assert main(["detect", str(video), "--config", config, "--annotate", str(out)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(warm)
    found = sum(
        sum(matched(s[1], [d["box"] for d in line["detections"] if d["label"] == "person"]))
        for s, line in zip(scenes, lines, strict=True)
    )
    assert found >= 5
    picture = cv2.imread(str(out))
    expected = ThermalImage(ThermalSection(normalise="fixed", range_c=[5.0, 40.0])).to_rgb(warm[-1])
    assert np.mean(np.abs(picture.astype(int) - expected[..., ::-1].astype(int))) < 25  # the fixed-range grey


def test_a_thermal_camera_box_alerts_for_warm_people_only(site, receiver, mock_factory, ssd):
    """The vision process opens a Y16 recording as it would a thermal camera (CONVERT_RGB off) and keeps its
    temperatures: warm people raise a signed intrusion at the centre, the same people at room temperature
    (a poster, a reflection) raise nothing, because the body-temperature band drops them."""
    from agent.device.agent import Agent
    from tests.agent.vision.scenes import MODEL_DIR
    from tests.agent.vision.test_vision_service import BUTTON
    from tests.conftest import wait_until

    frames = list(vtest_frames(limit=20))
    grey = [cv2.cvtColor(f.rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) for f in frames]
    background = np.median(np.stack(grey[::2]), axis=0)
    clips = {"warm": [], "cold": []}
    for frame, g in zip(frames, grey, strict=True):
        body = np.zeros_like(g, dtype=bool)
        h, w = g.shape
        for d in ssd.detect(frame.rgb):
            if d.label == "person" and d.score >= 0.5:
                box = (slice(int(d.box[1] * h), int(d.box[3] * h) + 1), slice(int(d.box[0] * w), int(d.box[2] * w) + 1))
                body[box] |= np.abs(g[box] - background[box]) > 20
        scene = 10 + g / 255 * 12
        clips["warm"].append(y16(np.where(body, 28 + g / 255 * 9, scene)))
        clips["cold"].append(y16(np.where(body, 16 + g / 255 * 6, scene)))

    def alerts(device):
        messages = receiver.store.messages(kind="alert", device=device)
        return [b for m in messages if (b := m.claims["body"]).get("rule")]

    for name, clip in clips.items():
        video = site.root / f"{name}.mkv"
        write_y16_video(video, clip)
        body = (
            f'{BUTTON}\n[camera]\nsource = "{video}"\n[camera.thermal]\nnormalise = "fixed"\n'
            f'range_c = [5.0, 40.0]\nbody_c = [28.0, 40.0]\n[detector]\nmodel_dir = "{MODEL_DIR}"\n'
            '[motion]\nenabled = false\n[[rules]]\nname = "anyone"\ntype = "intrusion"\nhysteresis_s = 30\n'
        )
        with Agent(site.add_device(f"cam-{name}", kind="camera-box", body=body), pin_factory=mock_factory) as agent:
            assert wait_until(lambda a=agent: a.vision.state == "ended", 30)
            if name == "warm":
                assert wait_until(lambda: alerts("cam-warm"), 10)
    assert [(a["rule"], a["phase"], a["source"]) for a in alerts("cam-warm")] == [("anyone", "start", "camera")]
    assert alerts("cam-cold") == []
