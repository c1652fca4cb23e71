"""The same devices on real hardware: run on a Raspberry Pi with EDGE_AGENT_PI_TESTS=1 (skipped elsewhere).

Wiring for these tests: a push button between GPIO17 and ground, an LED (with resistor) on GPIO5,
a camera module on the CSI port, optionally a UVC camera as /dev/video0.
"""

import os
import time
from pathlib import Path

import pytest

from hw.camera import open_camera
from hw.gpio import AlertButton, IndicatorState, StatusIndicator

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


def test_button_is_claimed_and_reads_released(lgpio_factory):
    with AlertButton(17, pin_factory=lgpio_factory) as button:
        assert button.is_pressed is False


def test_led_shows_each_state(lgpio_factory):
    with StatusIndicator(led_pin=5, pin_factory=lgpio_factory) as indicator:
        for state in IndicatorState:
            indicator.show(state)
            time.sleep(0.5)
            assert indicator.state is state


def test_picamera2_delivers_lores_and_main_frames():
    with open_camera("picamera2", width=640, height=480) as camera:
        frame = camera.read()
    assert frame.rgb.shape == (480, 640, 3) and frame.full.shape[2] == 3


@pytest.mark.skipif(not Path("/dev/video0").exists(), reason="no UVC camera at /dev/video0")
def test_uvc_camera_delivers_rgb_frames():
    with open_camera("/dev/video0", width=640, height=480, fps=10) as camera:
        frames = [camera.read() for _ in range(5)]
    assert all(f.rgb.ndim == 3 and f.rgb.shape[2] == 3 for f in frames)
