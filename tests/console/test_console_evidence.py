"""Evidence on the alert page: asked for by an operator, fetched from a real camera box's evidence server."""

from __future__ import annotations

import time

import pytest

from agent.protocol.messages import new_claims
from tests.console.conftest import csrf_of, log_in
from tests.console.test_console_browser import screenshot

evidence_security = pytest.importorskip("tests.agent.test_evidence_security")  # numpy and OpenCV make the JPEG


@pytest.fixture
def camera(site):
    """A camera box's evidence side (its link and EvidenceServer) with one image, and its alert stored."""
    config = site.add_device("cam-1", kind="camera-box", body=evidence_security.CAMERA)
    jpeg = evidence_security.redacted_jpeg()
    ref, sha256 = evidence_security.store_evidence(config, jpeg)
    with evidence_security.CameraEnd(config) as end:
        yield end, ref, sha256, jpeg


def test_an_operator_sees_the_checked_image_and_the_viewing_is_audited(browser, console, camera):
    _, ref, sha256, jpeg = camera
    body = {
        "source": "camera",
        "camera": "plaza",
        "rule": "crowd",
        "rule_type": "grouping",
        "zone": "plaza",
        "count": 6,
        "classes": ["person"],
        "objects": [{"label": "person"}] * 6,
        "evidence": {"ref": ref, "sha256": sha256},
    }
    console.store.insert(new_claims(device="cam-1", site="demo-site", seq=1, kind="alert", body=body), time.time())
    ana = log_in(browser, console, "ana")
    row = ana.wait_for_selector("tr.alert-row.real", timeout=5000)
    assert "rule crowd, zone plaza" in row.inner_text() and "person × 6" in row.inner_text()
    ana.locator("tr.alert-row.real a").click()
    ana.click("#evidence-form button")
    image = ana.wait_for_selector("#evidence-image", timeout=20000)
    assert ana.evaluate("document.getElementById('evidence-image').naturalWidth") == 320
    assert image.get_attribute("src").startswith("data:image/jpeg;base64,")
    screenshot(ana, "evidence")
    (viewed,) = [e for e in console.state.audit_log() if e.action == "evidence-viewed"]
    assert (viewed.actor, viewed.device, viewed.seq) == ("ana", "cam-1", 1) and ref in viewed.detail

    ian = log_in(browser, console, "ian")  # installer: no evidence
    ian.goto(console.url + "alerts/cam-1/1")
    assert ian.locator("#evidence-form").count() == 0
    refused = ian.request.post(console.url + "alerts/cam-1/1/evidence", form={"csrf": csrf_of(ian)}, max_redirects=0)
    assert refused.status == 403
    assert len([e for e in console.state.audit_log() if e.action.startswith("evidence")]) == 1
