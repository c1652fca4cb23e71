"""The same devices on real hardware: run on a Raspberry Pi with EDGE_AGENT_PI_TESTS=1 (skipped elsewhere).

The tests read the lines back instead of trusting the objects that drive them. Wiring:

- a push button between GPIO17 and ground, and a 1 kΩ resistor from GPIO16 to GPIO17: the test presses
  the button electrically by driving GPIO16 low (GPIO16 is only ever low or an input, never driven high);
- an LED (with resistor) on GPIO5, and a jumper wire from GPIO5 to GPIO6: the test reads the LED's line on GPIO6;
- a camera module on the CSI port, optionally a UVC camera as /dev/video0;
- the hardware watchdog armed by systemd (RuntimeWatchdogSec in /etc/systemd/system.conf, see the README).
"""

import os
import subprocess
from pathlib import Path

import pytest
from gpiozero import DigitalInputDevice

from hw.camera import open_camera
from hw.gpio import AlertButton, IndicatorState, StatusIndicator
from tests.conftest import wait_until
from tests.led import STEADY_S, assert_blinks, intervals_of, sample_line

BUTTON_PIN, PRESS_PIN = 17, 16
LED_PIN, LED_READBACK_PIN = 5, 6
#: What a person sees for each blinking state: (on_s, off_s).
BLINKS = {
    IndicatorState.PENDING: (0.1, 0.1),
    IndicatorState.FAULT: (0.5, 0.5),
    IndicatorState.IDLE: (0.05, 1.95),
}

pytestmark = [
    pytest.mark.pi,
    pytest.mark.skipif(
        os.environ.get("EDGE_AGENT_PI_TESTS") != "1", reason="hardware tests: run on a Pi with EDGE_AGENT_PI_TESTS=1"
    ),
]


@pytest.fixture
def lgpio_factory():
    from gpiozero.pins.lgpio import LGPIOFactory

    factory = LGPIOFactory()
    yield factory
    factory.close()


@pytest.fixture
def led_line(lgpio_factory):
    """Reads the LED's line over the jumper to GPIO6: what the LED really gets."""
    with DigitalInputDevice(LED_READBACK_PIN, pull_up=False, pin_factory=lgpio_factory) as readback:
        yield lambda: bool(readback.value)


def test_button_reads_released_and_fires_once_on_a_real_press(lgpio_factory):
    presser = lgpio_factory.pin(PRESS_PIN)
    with AlertButton(BUTTON_PIN, pin_factory=lgpio_factory) as button:
        fired = []
        button.when_activated = fired.append
        assert button.is_pressed is False  # the internal pull-up holds the line high
        presser.function = "output"  # claimed low: pulls GPIO17 to ground through 1 kΩ, as the button does
        presser.state = False
        assert wait_until(lambda: fired, 2), "no activation: check the 1 kΩ resistor from GPIO16 to GPIO17"
        assert button.is_pressed
        presser.function = "input"  # let go: the pull-up takes the line high again
        assert wait_until(lambda: not button.is_pressed, 2)
        assert len(fired) == 1


def test_led_line_follows_each_state(lgpio_factory, led_line):
    with StatusIndicator(led_pin=LED_PIN, pin_factory=lgpio_factory) as indicator:
        indicator.show(IndicatorState.ACKNOWLEDGED)
        samples = sample_line(led_line, STEADY_S)
        assert all(lit for _, lit in samples), "LED line not steadily high: check the jumper from GPIO5 to GPIO6"
        for state, (on_s, off_s) in BLINKS.items():
            indicator.show(state)
            samples = sample_line(led_line, 2 * (on_s + off_s) + 0.3)  # at least one whole on and off
            assert_blinks(intervals_of(samples), on_s, off_s, cycles=1)


def test_picamera2_delivers_lores_and_main_frames():
    with open_camera("picamera2", width=640, height=480) as camera:
        frame = camera.read()
    assert frame.rgb.shape == (480, 640, 3) and frame.full.shape[2] == 3


@pytest.mark.skipif(not Path("/dev/video0").exists(), reason="no UVC camera at /dev/video0")
def test_uvc_camera_delivers_rgb_frames():
    with open_camera("/dev/video0", width=640, height=480, fps=10) as camera:
        frames = [camera.read() for _ in range(5)]
    assert all(f.rgb.ndim == 3 and f.rgb.shape[2] == 3 for f in frames)


def test_hardware_watchdog_is_armed_by_systemd():
    """The Pi reboots itself if the whole system hangs: systemd holds the SoC's watchdog (README, RuntimeWatchdogSec)."""
    device = Path("/sys/class/watchdog/watchdog0")
    assert device.exists(), "no watchdog0: add dtparam=watchdog=on to /boot/firmware/config.txt"
    assert "watchdog" in (device / "identity").read_text().lower()
    assert (device / "state").read_text().strip() == "active", "nothing holds /dev/watchdog: set RuntimeWatchdogSec"
    armed = subprocess.run(
        ["systemctl", "show", "--property=RuntimeWatchdogUSec", "--value"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert armed not in ("", "0", "infinity"), "set RuntimeWatchdogSec=15 in /etc/systemd/system.conf"
