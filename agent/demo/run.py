"""``edge-agent demo``: a broker, the centre's receiver, a call point and a camera box on this machine.

The call point uses gpiozero's mock pins; the camera box replays a video
(vtest.avi, or ``--video``) through the real detector, tracker and rules. The
centre's view is printed live; at the end an annotated picture and a summary.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from gpiozero.pins.mock import MockFactory

from agent.centre.receiver import Receiver, Verdict
from agent.centre.registry import DeviceEvent
from agent.demo.broker import LocalBroker
from agent.demo.site import LocalSite
from agent.device.agent import Agent
from agent.errors import AgentError, BrokerUnavailable, ModelError
from hw.gpio import IndicatorState

CALL_POINT = (
    '[[buttons]]\nname = "help"\npin = 17\nalert_kind = "assistance"\nlocation = "Street call point, north side"\n\n'
    '[[buttons]]\nname = "duress"\npin = 27\nalert_kind = "duress"\nactivation = "hold"\nhold_s = 1.0\n'
    "silent = true\n\n[tamper]\npin = 22\n\n[indicator]\nled_pin = 5\nbuzzer_pin = 6\nack_display_s = 5\n\n"
    "[telemetry]\ninterval_s = 5\n"
)
ZONES = (
    '[[zones]]\nname = "plaza"\npolygon = [[0.0, 0.25], [1.0, 0.25], [1.0, 1.0], [0.0, 1.0]]\n\n'
    '[[zones]]\nname = "walkway"\npolygon = [[0.55, 0.3], [1.0, 0.3], [1.0, 0.75], [0.55, 0.75]]\n\n'
    "[[privacy_masks]]\npolygon = [[0.0, 0.0], [0.35, 0.0], [0.35, 0.12], [0.0, 0.12]]\n"
)
RULES = (
    '[[rules]]\nname = "plaza-grouping"\ntype = "grouping"\nzone = "plaza"\nmin_count = 7\nmin_duration_s = 2\n'
    "hysteresis_s = 3\ncooldown_s = 10\n\n"
    '[[rules]]\nname = "walkway-intrusion"\ntype = "intrusion"\nzone = "walkway"\nhysteresis_s = 3\ncooldown_s = 20\n\n'
    '[[rules]]\nname = "camera-tamper"\ntype = "camera_tamper"\nmin_duration_s = 3\n'
)


def _say(text: str) -> None:
    print(text, flush=True)


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def find_demo_media(video: Path | None) -> tuple[Path | None, Path | None, str]:
    """The video and model directory for the camera box, or why there are none."""
    shared = Path(
        os.environ.get("EDGE_AGENT_SHARED", Path(__file__).resolve().parents[3] / "shared")
    )  # beside the checkout
    candidates = (
        [video] if video else [shared / "data/vtest.avi", Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")]
    )
    found = next((c for c in candidates if c and c.exists()), None)
    if found is None:
        return (
            None,
            None,
            (f"no video at {candidates[0]}; give --video FILE (Debian's opencv-doc package has vtest.avi)"),
        )
    model_dir = shared / "models"
    if (model_dir / "ssd_mobilenet_v1_coco_quant.tflite").exists():
        return found, model_dir, ""
    cache = Path.home() / ".cache/edge-agent/models"
    try:
        from models import find_model
        from models.fetch import fetch_model

        fetch_model(find_model("ssd-mobilenet-v1-coco-quant"), cache)
        return found, cache, ""
    except (AgentError, ModelError, ImportError) as exc:
        return found, None, f"no detection model ({exc})"


class CentreView:
    """What the supervision centre sees, printed as it happens."""

    def __init__(self):
        self.alerts: list[Verdict] = []
        self.events: list[Verdict] = []
        self.rejected = 0
        self._lock = threading.Lock()

    def verdict(self, verdict: Verdict) -> None:
        claims = verdict.claims
        if verdict.outcome == "rejected":
            self.rejected += 1
            _say(f"  centre ✗ rejected a message: {verdict.reason}")
            return
        if claims is None or verdict.outcome != "accepted":
            return
        body = claims.body
        with self._lock:
            if claims.kind == "alert":
                self.alerts.append(verdict)
            elif claims.kind in ("event", "tamper"):
                self.events.append(verdict)
        where = f"{claims.site}/{claims.device}"
        if claims.kind == "alert" and body.get("source") == "camera":
            _say(
                f"  centre ⚠ ALERT {where}: {body['rule']} started in zone {body.get('zone') or 'view'} "
                f"({body['count']} {', '.join(body.get('classes') or [])}; tracks {body['track_ids']})"
            )
        elif claims.kind == "alert":
            _say(
                f"  centre ⚠ ALERT {where}: {body['alert_kind']} from button '{body['button']}' "
                f"at {body['location'] or 'unnamed spot'} (seq {claims.seq}, signature verified)"
            )
        elif claims.kind == "event" and body.get("source") == "camera":
            _say(f"  centre · {where}: {body['rule']} {body['phase']} (count {body['count']})")
        elif claims.kind in ("event", "tamper"):
            _say(f"  centre · {where}: {claims.kind} {body}")
        elif claims.kind == "telemetry":
            vision = body.get("vision") or {}
            extra = (
                f", camera {vision.get('camera_fps', 0):.0f} fps, inference {vision.get('inference_ms_avg', 0):.0f} ms"
                if vision.get("frames")
                else ""
            )
            _say(
                f"  centre ♥ {where}: up {body['uptime_s']:.0f} s, outbox {body['outbox_depth']}, "
                f"load {body['cpu_load'][0]}{extra}"
            )

    def device_event(self, event: DeviceEvent) -> None:
        _say(f"  centre ! device {event.site}/{event.device} {event.event}: {event.detail}")


def open_console(site: LocalSite):
    """The operators' console on the demo's store, with a one-off account; None (and why) without the centre extra."""
    import secrets

    try:
        from agent.console.auth import hash_password
        from agent.console.server import Console
    except ImportError as exc:
        _say(f"(console left out: {exc.name} is not installed; pip install -e '.[centre]')")
        return None
    console = Console(site.receiver_config, listen="127.0.0.1:0")
    password = secrets.token_urlsafe(9)
    console.state.add_operator("demo", hash_password(password), "supervisor", time.time())
    url = console.start()
    _say(f"operators' console: {url}  (log in as 'demo', password {password}; open while the demo runs)")
    return console


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_demo(seconds: float = 20.0, video: Path | None = None, out: Path = Path("edge-demo.png")) -> int:
    # Ctrl-C and a plain kill both end the demo cleanly, even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        broker = LocalBroker()
    except BrokerUnavailable as exc:
        _say(f"The demo needs a local MQTT broker: {exc}")
        return 1
    view = CentreView()
    video, model_dir, missing = find_demo_media(video)
    with broker, tempfile.TemporaryDirectory(prefix="edge-demo-") as root:
        _say(f"mosquitto on {broker.host}:{broker.port}; the whole site lives in {root}")
        site = LocalSite(Path(root), broker)
        call_point = site.add_device("call-point-1", body=CALL_POINT)
        camera_box = None
        if model_dir is not None:
            camera_box = site.add_device(
                "camera-box-1",
                kind="camera-box",
                body=(
                    f'[camera]\nsource = "{video}"\nname = "plaza"\nrealtime = true\nloop = true\n\n'
                    f'[detector]\nmodel_dir = "{model_dir}"\n\n[motion]\nenabled = false\n\n'
                    f"[telemetry]\ninterval_s = 5\n\n{ZONES}\n{RULES}"
                ),
            )
        else:
            _say(f"(camera box left out: {missing})")
        factory = MockFactory()
        try:
            with (
                Receiver(site.receiver_config, on_verdict=view.verdict, on_device_event=view.device_event) as receiver,
                Agent(call_point, pin_factory=factory) as agent,
            ):
                console = open_console(site)
                boxes = [Agent(camera_box, pin_factory=MockFactory())] if camera_box else []
                for box in boxes:
                    box.start()
                try:
                    return _script(agent, factory, receiver, boxes, view, seconds, video, camera_box, out)
                finally:
                    for box in boxes:
                        box.close()
                    if console is not None:
                        console.close()
        except KeyboardInterrupt:
            _say("stopped (Ctrl-C); everything closed cleanly")
            return 130


def _script(agent, factory, receiver, boxes, view, seconds, video, camera_box, out) -> int:
    factory.pin(22).drive_low()  # the installer shuts the lid: tamper switch closed
    if not agent.link.wait_connected(10):
        _say("the call point could not reach the broker")
        return 1
    _say(f"call point connected; its LED shows {agent.indicator_state().value}")
    _say("someone presses the help button…")
    pressed = time.monotonic()
    factory.pin(17).drive_low()
    factory.pin(17).drive_high()
    acknowledged = _wait_for(lambda: agent.indicator_state() is IndicatorState.ACKNOWLEDGED, 10)
    _say(
        f"  call point: LED shows '{agent.indicator_state().value}' {(time.monotonic() - pressed) * 1000:.1f} ms "
        "after the press (the centre's signed ack, verified)"
    )
    _say("someone holds the silent duress button for 1 s…")
    factory.pin(27).drive_low()
    _wait_for(lambda: agent.buttons["duress"].activations > 0, 5)
    factory.pin(27).drive_high()
    _say(f"  call point: LED unchanged ({agent.indicator_state().value}): a duress alert is silent")
    if boxes:
        _say(f"camera box replays {video.name} through the detector for {seconds:g} s…")
    time.sleep(seconds)
    _say("the fleet as the centre sees it:")
    for state in receiver.registry.states():
        health = state.last_telemetry or {}
        _say(
            f"  {state.site}/{state.device}: {state.status}, outbox {health.get('outbox_depth', '-')}, "
            f"version {health.get('version', '-')}"
        )
    if camera_box is not None:
        _write_picture(camera_box, video, out)
    alerts = receiver.store.messages(kind="alert")
    _say("summary:")
    _say(
        f"  alerts verified and stored at the centre: {len(alerts)} "
        f"({sum(1 for m in alerts if m.claims['body'].get('source') == 'camera')} from the camera)"
    )
    _say(f"  camera events (updates, ends, faults): {len(view.events)}; rejected messages: {view.rejected}")
    _say(f"  help button acknowledged on the device: {acknowledged}; call point outbox depth: {agent.outbox.depth()}")
    return 0 if acknowledged and len(alerts) >= 2 else 1


def _write_picture(config, video: Path, out: Path) -> None:
    from agent.vision.annotate import annotate, write_png
    from agent.vision.detector import Detector
    from hw.camera_opencv import OpenCVCamera

    with OpenCVCamera(str(video)) as camera:
        frame = camera.read()
    vision = config.vision_config()
    detector = Detector.from_settings(vision.detector, config.model_dir)
    redactor = _demo_redactor(vision, config.model_dir)
    if redactor.unavailable:
        _say(f"  no picture drawn: {redactor.unavailable}")
        return
    write_png(out, annotate(frame.rgb, detector.detect(frame.rgb), redactor, vision))
    _say(f"  annotated picture of what the camera box sees, faces covered: {out.resolve()}")


def _demo_redactor(vision, model_dir: Path):
    """The face model from the model directory, else fetched once into the user's cache, like the detector."""
    from agent.vision.redaction import Redactor
    from models import find_model, verify_model_file
    from models.fetch import fetch_model

    spec = find_model(vision.evidence.face_model)
    try:
        verify_model_file(spec, model_dir)
    except ModelError:
        cache = Path.home() / ".cache/edge-agent/models"
        try:
            fetch_model(spec, cache, progress=False)
            model_dir = cache
        except ModelError as exc:
            _say(f"  face model not fetched: {exc}")
    return Redactor.for_camera(vision, model_dir)
