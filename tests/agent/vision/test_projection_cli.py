"""An installer checks a 360° camera from one image: ``detect --config`` and ``snapshot`` use its projection."""

from __future__ import annotations

import json

import cv2
import pytest
from pydantic import ValidationError

from agent.cli import main
from agent.config.vision import ProjectionSection, VisionConfig
from tests.agent.vision.fisheye_scenes import box_in_fisheye, fisheye_from_perspective, matched
from tests.agent.vision.scenes import MODEL_DIR, VIDEO, require_shared, vtest_frames

VIEWS = (
    '[[camera.projection.views]]\nname = "left"\nyaw = 30.0\nfov = 60.0\n'
    '[[camera.projection.views]]\nname = "right"\nyaw = 60.0\nfov = 60.0\n'
)


def test_detect_with_a_fisheye_config_finds_people_in_fisheye_coordinates(
    site, tmp_path, capsys, ssd, model_dir_with_faces
):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    frame = next(vtest_frames(limit=1))
    image = tmp_path / "fisheye.png"
    cv2.imwrite(str(image), cv2.cvtColor(fisheye_from_perspective(frame.rgb, 1600, 60.0), cv2.COLOR_RGB2BGR))
    body = (
        f'[camera]\nsource = "{image}"\n[camera.projection]\ntype = "fisheye"\n{VIEWS}'
        f'[detector]\nmodel_dir = "{model_dir_with_faces}"\nmin_score = 0.4\n'
        '[[zones]]\nname = "path"\nview = "right"\npolygon = [[0.1, 0.3], [0.9, 0.3], [0.9, 0.9], [0.1, 0.9]]\n'
    )
    site.add_device("cam-360", kind="camera-box", body=body)
    out = tmp_path / "views.png"
    config = str(site.device_config_path("cam-360"))
    assert main(["detect", str(image), "--config", config, "--annotate", str(out)]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    people = [
        box_in_fisheye(d.box, 768, 576, 60.0) for d in ssd.detect(frame.rgb) if d.label == "person" and d.score >= 0.5
    ]
    found = [d["box"] for d in line["detections"] if d["label"] == "person"]
    assert sum(matched(people, found)) >= 0.8 * len(people)
    picture = cv2.imread(str(out))
    assert picture.shape[1] == 1600 and picture.shape[0] == 1600 + 244  # the fisheye, then the two views
    strip = picture[1600:]
    assert (strip == (255, 0, 255)).all(axis=2).any()  # view borders
    assert (strip == (0, 200, 255)).all(axis=2).sum() > 100  # the zone, drawn on the "right" view


def test_snapshot_of_a_fisheye_camera_shows_its_views(site, tmp_path, capsys, model_dir_with_faces):
    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    video = tmp_path / "fisheye.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (800, 800))
    for frame in vtest_frames(limit=6):
        writer.write(cv2.cvtColor(fisheye_from_perspective(frame.rgb, 800, 60.0), cv2.COLOR_RGB2BGR))
    writer.release()
    body = f'[camera]\nsource = "{video}"\n[camera.projection]\ntype = "fisheye"\n{VIEWS}[detector]\nmodel_dir = "{model_dir_with_faces}"\n'
    site.add_device("cam-360s", kind="camera-box", body=body)
    out = tmp_path / "aim.png"
    assert main(["snapshot", "--config", str(site.device_config_path("cam-360s")), "--out", str(out)]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["size"] == [800, 800]
    assert cv2.imread(str(out)).shape[0] == 800 + 244


def test_projection_settings_are_checked():
    with pytest.raises(ValidationError, match="fov: fisheye settings, not for an equirectangular camera"):
        ProjectionSection(type="equirectangular", fov=200)
    with pytest.raises(ValidationError, match="view names must be unique; repeated: a"):
        ProjectionSection(type="fisheye", views=[{"name": "a"}, {"name": "a", "yaw": 40}])
    with pytest.raises(ValidationError, match="zone 'gate' is drawn on view 'north', which is not defined"):
        VisionConfig.model_validate(
            {
                "camera": {"source": str(VIDEO), "projection": {"type": "equirectangular"}},
                "zones": [{"name": "gate", "view": "north", "polygon": [[0, 0], [1, 0], [1, 1]]}],
            }
        )
    with pytest.raises(ValidationError, match="drawn on view 'north', but the camera has no projection"):
        VisionConfig.model_validate(
            {
                "camera": {"source": str(VIDEO)},
                "zones": [{"name": "g", "view": "north", "polygon": [[0, 0], [1, 0], [1, 1]]}],
            }
        )
    default = ProjectionSection(type="equirectangular")
    assert [v.yaw for v in default.views] == [0, 60, 120, 180, 240, 300]


def test_a_fisheye_camera_box_alerts_on_a_zone_drawn_on_a_view(site, receiver, mock_factory):
    """The vision process dewarps a fisheye recording and raises an intrusion in a zone drawn on one view;
    a zone drawn on a view of the empty part of the lens stays quiet."""
    from agent.device.agent import Agent
    from tests.agent.vision.test_vision_service import BUTTON
    from tests.conftest import wait_until

    require_shared("data/vtest.avi", "models/ssd_mobilenet_v1_coco_quant.tflite")
    video = site.root / "fisheye.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (1200, 1200))
    for frame in vtest_frames(limit=15):
        writer.write(cv2.cvtColor(fisheye_from_perspective(frame.rgb, 1200, 60.0), cv2.COLOR_RGB2BGR))
    writer.release()
    whole = "polygon = [[0.02, 0.02], [0.98, 0.02], [0.98, 0.98], [0.02, 0.98]]\n"
    body = (
        f'{BUTTON}\n[camera]\nsource = "{video}"\n[camera.projection]\ntype = "fisheye"\n{VIEWS}'
        '[[camera.projection.views]]\nname = "ahead"\nfov = 40.0\n'
        f'[detector]\nmodel_dir = "{MODEL_DIR}"\n[motion]\nenabled = false\n'
        f'[[zones]]\nname = "path"\nview = "right"\n{whole}[[zones]]\nname = "door"\nview = "ahead"\n{whole}'
        '[[rules]]\nname = "on-path"\ntype = "intrusion"\nzone = "path"\n'
        '[[rules]]\nname = "at-door"\ntype = "intrusion"\nzone = "door"\n'
    )
    with Agent(site.add_device("cam-360", kind="camera-box", body=body), pin_factory=mock_factory) as agent:
        assert wait_until(lambda: agent.vision.state == "ended", 30)
        assert wait_until(lambda: receiver.store.messages(kind="alert"), 10)
    alerts = [m.claims["body"] for m in receiver.store.messages(kind="alert") if m.claims["body"].get("rule")]
    assert [(a["rule"], a["zone"]) for a in alerts] == [("on-path", "path")]
    boxes = [o["box"] for o in alerts[0]["objects"]]
    assert boxes and all(box[0] > 0.6 for box in boxes)  # in fisheye coordinates: the right side of the lens
