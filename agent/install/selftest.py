"""``edge-agent selftest``: every part of the box, one line each, with a fix for what fails.

Run by the installer on the ladder (stop the service first: the GPIO lines and
camera must be free). Checks, in order: config, keys, GPIO lines, buttons
(``--interactive``: press each), LED and buzzer, camera, model, broker (reach,
TLS, login), a signed test message acknowledged by the centre, the clock
against the centre's, and disk space for the outbox.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.errors import AgentError, ModelError

MIN_FREE_MB = 100
NO_GPIO_HINT = (
    "run it on the Pi (Raspberry Pi OS: sudo apt install python3-lgpio; plain Debian: the [pi] extra); "
    "--mock-pins checks the rest without hardware; in a container, pass /dev/gpiochip* through"
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""

    def line(self) -> str:
        text = f"{'✓' if self.ok else '✗'} {self.name}: {self.detail}"
        return text if self.ok or not self.hint else f"{text}\n    fix: {self.hint}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SelfTest:
    def __init__(
        self,
        config_path: Path,
        *,
        pin_factory=None,
        interactive: bool = False,
        ask: Callable[[str], str] = input,
        say: Callable[[str], None] = print,
        timeout_s: float = 10.0,
    ):
        self.config_path = Path(config_path)
        self.pin_factory = pin_factory
        self.interactive = interactive
        self.ask = ask
        self.say = say
        self.timeout_s = timeout_s
        self.checks: list[Check] = []
        self.config = None

    def add(self, name: str, ok: bool, detail: str, hint: str = "") -> Check:
        check = Check(name, ok, detail, hint)
        self.checks.append(check)
        return check

    def run(self) -> list[Check]:
        from agent.config.device import load_agent_config
        from agent.errors import ConfigError

        try:
            self.config = load_agent_config(self.config_path)
        except ConfigError as exc:
            self.add("config", False, "; ".join(exc.problems), f"edit {self.config_path}")
            return self.checks
        device = self.config.device
        self.add("config", True, f"{device.kind} {device.site}/{device.id} ({self.config_path})")
        keys_ok = self._keys()
        self._gpio()
        if self.config.camera is not None:
            frame = self._camera()
            self._model(frame)
            self._face_model(frame)
        if keys_ok:
            self._broker_round_trip()
        self._disk()
        return self.checks

    # Identity

    def _keys(self) -> bool:
        from agent.config.secrets import resolve_secret
        from agent.device.evidence_server import require_sealing_key
        from agent.protocol.sealing import load_centre_keys
        from agent.protocol.signing import key_id, load_private_key

        config = self.config
        path = resolve_secret(config.identity.private_key_file, *config.secret_dirs)
        try:
            self.key = load_private_key(path)
            self.add("device key", True, f"{path}, mode 0600, kid {key_id(self.key)}")
        except (AgentError, ModelError) as exc:
            self.add("device key", False, str(exc), "create it with 'edge-agent provision' or 'edge-agent keys init'")
            return False
        centre = resolve_secret(config.identity.centre_key_file, *config.secret_dirs)
        try:
            centre_keys = load_centre_keys(centre)
            require_sealing_key(config.rules, centre_keys)
            self.centre_key = centre_keys.signing
            sealing = "signing and encryption keys" if centre_keys.encryption else "signing key only"
            self.add("centre key", True, f"{centre} ({sealing})")
        except (AgentError, ModelError) as exc:
            self.add("centre key", False, str(exc), "copy the key set 'edge-agent receiver init' printed there")
            return False
        return True

    # GPIO

    def _gpio(self) -> None:
        from gpiozero import LED, Button, Buzzer

        config = self.config
        claimed = []
        lines = [
            (f"button '{b.name}'", b.pin, lambda b=b: Button(b.pin, pull_up=b.pull_up, pin_factory=self.pin_factory))
            for b in config.buttons
        ]
        if config.tamper is not None:
            tamper = config.tamper
            lines.append(
                (
                    "tamper switch",
                    tamper.pin,
                    lambda: Button(tamper.pin, pull_up=tamper.pull_up, pin_factory=self.pin_factory),
                )
            )
        for what, device in (("LED", LED), ("buzzer", Buzzer)):
            pin = getattr(config.indicator, "led_pin" if what == "LED" else "buzzer_pin")
            if pin is not None:
                lines.append((what, pin, lambda pin=pin, device=device: device(pin, pin_factory=self.pin_factory)))
        try:
            for name, pin, make in lines:
                try:
                    device = make()
                except Exception as exc:
                    if (missing := self._no_gpio(exc)) is not None:  # the same for every line: say it once
                        self.add("GPIO", False, missing, NO_GPIO_HINT)
                        break
                    self.add(
                        f"GPIO {name}",
                        False,
                        f"pin {pin!r}: {exc}",
                        "check the pin number in the config and the wiring; stop the edge-agent service "
                        "while testing (it holds the lines)",
                    )
                    continue
                claimed.append((name, device))
                state = f", reads {'pressed' if device.is_active else 'released'}" if isinstance(device, Button) else ""
                self.add(f"GPIO {name}", True, f"pin {pin!r} claimed{state}")
            for name, device in claimed:
                if isinstance(device, Button) and name.startswith("button") and self.interactive:
                    self.say(f"press {name} now…")
                    pressed = device.wait_for_press(timeout=self.timeout_s)
                    self.add(
                        f"press {name}",
                        bool(pressed),
                        "press seen" if pressed else "no press seen",
                        "check the button's wiring to the pin and ground",
                    )
            outputs = [(n, d) for n, d in claimed if n in ("LED", "buzzer")]
            if outputs:
                for _, device in outputs:
                    device.on()
                time.sleep(1.0)
                for _, device in outputs:
                    device.off()
                names = " and ".join(n for n, _ in outputs)
                if self.interactive:
                    seen = self.ask(f"did the {names} come on for a second? [y/n] ").strip().lower().startswith("y")
                    self.add(
                        f"{names} pulse",
                        seen,
                        "seen by the installer" if seen else "not seen",
                        "check the polarity and series resistor / transistor",
                    )
                else:
                    self.add(f"{names} pulse", True, "pulsed for 1 s (use --interactive to confirm by eye)")
        finally:
            for _, device in claimed:
                device.close()

    def _no_gpio(self, exc: Exception) -> str | None:
        """What is missing when no pin factory could start at all (no GPIO chip, no lgpio); None if only the line failed."""
        from gpiozero import Device

        if self.pin_factory is not None or Device.pin_factory is not None:
            return None
        factory = os.environ.get("GPIOZERO_PIN_FACTORY", "default")
        chips = sorted(str(p) for p in Path("/dev").glob("gpiochip*"))
        where = f"GPIO chips {', '.join(chips)}" if chips else "no GPIO chip on this machine (no /dev/gpiochip*)"
        return f"{where}; the {factory} pin factory cannot start: {exc}"

    # Camera and model

    def _camera(self):
        from agent.errors import ConfigError
        from hw.camera import CameraUnavailable, open_camera

        settings = self.config.camera
        try:
            login = self.config.camera_login()
            camera = open_camera(
                settings.source, width=settings.width, height=settings.height, fps=settings.fps, **login
            )
            camera.open()
        except (CameraUnavailable, ConfigError) as exc:
            self.add("camera", False, str(exc), "check the cable/URL, and that no other program uses the camera")
            return None
        frames, first, start = 0, None, time.monotonic()
        try:
            while time.monotonic() - start < 2.0:
                frame = camera.read()
                if frame is None:
                    break
                first = first or frame
                frames += 1
        except CameraUnavailable as exc:
            self.add("camera", False, str(exc), "check the cable/URL and the camera's power")
            return None
        finally:
            camera.close()
        fps = frames / max(time.monotonic() - start, 1e-3)
        if first is None:
            self.add("camera", False, "opened but delivered no frames", "check the camera's power and stream")
            return None
        shape = first.rgb.shape
        live = not getattr(camera, "is_file", False)
        ok = fps >= 0.5 * settings.fps or not live
        self.add(
            "camera",
            ok,
            f"{shape[1]}x{shape[0]} at {fps:.1f} fps (configured {settings.fps:g})",
            "lower camera.fps or the resolution; check the network for IP cameras",
        )
        return first

    def _face_model(self, frame) -> None:
        """Pictures (evidence, snapshots) are redacted by the face model, or not written at all."""
        from agent.vision.redaction import Redactor

        vision = self.config.vision_config()
        redactor = Redactor.for_camera(vision, self.config.model_dir)
        if redactor.unavailable:
            hint = f"edge-agent models fetch {vision.evidence.face_model}"
            self.add("face model", False, redactor.unavailable + "; no picture can be written", hint)
            return
        if frame is not None:
            redactor.redact(frame.full if frame.full is not None else frame.rgb, [])
        self.add("face model", True, f"{vision.evidence.face_model}: sha256 ok, {redactor.last_ms:.0f} ms per picture")

    def _model(self, frame) -> None:

        from agent.vision.detector import Detector

        settings = self.config.detector
        try:
            detector = Detector.from_settings(settings, self.config.model_dir)
        except (AgentError, ModelError) as exc:
            self.add("model", False, str(exc), f"edge-agent models fetch {settings.model}")
            return
        import numpy as np

        image = frame.rgb if frame is not None else np.zeros((480, 640, 3), np.uint8)
        detector.detect(image)
        detector.detect(image)
        self.add(
            "model",
            True,
            f"{settings.model}: sha256 ok, {detector.runtime}, {detector.last_invoke_ms:.0f} ms per inference",
        )

    # Broker, centre and clock

    def _broker_round_trip(self) -> None:
        from agent.errors import ConfigError
        from agent.mqtt.link import MqttLink

        config = self.config
        try:
            link = MqttLink(
                config.mqtt,
                client_id=f"selftest-{config.device.id}",
                secret_dirs=config.secret_dirs,
                session_expiry_s=0,
            )
        except ConfigError as exc:  # a CA, certificate, key or password file that cannot be read or used
            self.add("broker", False, str(exc), "put the file in the credentials directory, readable, in PEM")
            return
        try:
            if self._broker_reached(link):
                self._centre_answers(link)
        finally:
            link.close()

    def _broker_reached(self, link) -> bool:
        mqtt = self.config.mqtt
        problem = link.probe(self.timeout_s)
        if problem:
            hint = "check mqtt.host/port, the CA file, the user name and password, and that the firewall lets the port through"
            self.add("broker", False, problem, hint)
            return False
        mode = "TLS verified" if mqtt.tls.enabled else "no TLS"
        login = f", logged in as {mqtt.username}" if mqtt.username else ""
        self.add("broker", True, f"{mqtt.host}:{mqtt.port} ({mode}{login})")
        return True

    def _centre_answers(self, link) -> None:
        """A signed test message to the centre; its signed answer tells the round trip and the clock offset."""
        from agent.device.outbox import Outbox
        from agent.protocol.messages import TopicLayout, new_claims
        from agent.protocol.signing import MessageSigner

        config = self.config
        device, site = config.device.id, config.device.site
        topics = TopicLayout(config.mqtt.topic_prefix)
        answers: queue.Queue[tuple[bytes, float]] = queue.Queue()
        link.on_message = lambda topic, payload: answers.put((payload, time.time()))
        link.subscribe(topics.topic(site, device, "ack"))
        link.wait_subscribed(self.timeout_s)
        with Outbox(config.outbox_path, config.outbox.capacity) as outbox:
            seq = outbox.next_sequence()
        claims = new_claims(device=device, site=site, seq=seq, kind="test", body={"selftest": True}, test=True)
        sent_at = time.time()
        link.publish(topics.for_kind(site, device, "test"), MessageSigner(self.key).sign(claims).encode())
        answer = self._answer_to(claims, answers)
        if answer is None:
            hint = (
                "is this device enrolled at the centre (edge-agent receiver enroll) and the receiver running? "
                "A clock far off the centre's also makes it reject messages"
            )
            self.add("centre round trip", False, f"no acknowledgement within {self.timeout_s:g} s", hint)
            self._clock(None)
            return
        ack, received_at = answer
        offset = ack.sent - (sent_at + received_at) / 2
        if ack.kind == "nak":
            hint = "enable NTP (the running agent corrects its signing time from the centre's answers, but the clock should be right)"
            self.add(
                "centre round trip",
                False,
                f"the centre refused the test message as {ack.reason}: this clock is {-offset:+.0f} s off",
                hint,
            )
        else:
            took_ms = (received_at - sent_at) * 1000
            self.add(
                "centre round trip", True, f"test message seq {seq} acknowledged by {ack.receiver} in {took_ms:.0f} ms"
            )
        self._clock(offset)

    def _answer_to(self, claims: dict, answers: queue.Queue) -> tuple | None:
        """The centre's verified answer to exactly this message, and when it arrived; None on time-out."""
        from agent.errors import SignatureInvalid
        from agent.protocol.messages import AckClaims
        from agent.protocol.signing import verify_claims

        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                payload, received_at = answers.get(timeout=left)
                answer = verify_claims(AckClaims, payload, self.centre_key)
            except queue.Empty:
                return None
            except SignatureInvalid:
                continue  # not the centre's, or not an answer: anyone can publish on the ack topic
            if answer.seq == claims["seq"] and str(answer.event_id) == claims["event_id"]:
                return answer, received_at
        return None

    def _clock(self, offset_s: float | None) -> None:
        synced = _ntp_synchronised()
        window = 20.0  # the receiver's tighter bound (future), see receiver.window_future_s
        if offset_s is not None and abs(offset_s) > window:
            self.add(
                "clock",
                False,
                f"{offset_s:+.1f} s off the centre's clock",
                "enable NTP: sudo timedatectl set-ntp true (the centre rejects messages more than 20-40 s off)",
            )
        elif synced is False:
            self.add(
                "clock",
                False,
                "NTP not synchronised" + (f" (offset {offset_s:+.2f} s)" if offset_s else ""),
                "sudo timedatectl set-ntp true; check that UDP 123 reaches an NTP server",
            )
        elif offset_s is None and synced is None:
            self.add(
                "clock",
                False,
                "cannot tell: no acknowledgement from the centre and no timedatectl",
                "fix the centre round trip first",
            )
        else:
            detail = f"{offset_s:+.2f} s from the centre's clock" if offset_s is not None else "NTP synchronised"
            self.add("clock", True, detail + (", NTP synchronised" if synced and offset_s is not None else ""))

    def _disk(self) -> None:
        state_dir = self.config.state_dir
        try:
            free_mb = shutil.disk_usage(state_dir).free // (1024 * 1024)
        except OSError as exc:
            self.add("disk", False, f"{state_dir}: {exc.strerror}", "create the state directory (systemd does it)")
            return
        self.add(
            "disk",
            free_mb >= MIN_FREE_MB,
            f"{free_mb} MB free for the outbox in {state_dir}",
            f"free space on the SD card: at least {MIN_FREE_MB} MB",
        )


def _ntp_synchronised() -> bool | None:
    """What systemd says of NTP, or None where there is no timedatectl (containers, other inits)."""
    try:
        result = subprocess.run(
            ["timedatectl", "show", "--property=NTPSynchronized", "--value"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() == "yes"
