"""Only a fresh message proves that a device is alive: replays and last wills never do."""

import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho

from agent.centre.receiver import Receiver
from agent.config.centre import load_receiver_config
from tests.conftest import wait_until

SUPERVISION_S = 12


class Recorder:
    """A broker user who captures every message of one device, to replay them later."""

    def __init__(self, broker, topic_filter: str):
        self.messages: list[tuple[str, bytes]] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_connect = lambda c, *args: c.subscribe(topic_filter, qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(10)

    def channel(self, name: str) -> list[bytes]:
        return [payload for topic, payload in self.messages if topic.endswith("/" + name)]

    def replay(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            topic = next(t for t, p in self.messages if p == payload)
            self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def receiver_config(site):
    path = site.receiver_toml_path()
    text = path.read_text()
    if "supervision_s" not in text:
        text = text.replace(
            'credentials_dir = "credentials"', f'credentials_dir = "credentials"\nsupervision_s = {SUPERVISION_S}'
        )
        path.write_text(text)
    return load_receiver_config(path)


def run_agent(site, device: str) -> subprocess.Popen:
    config = site.device_config_path(device)
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--mock-pins", "--config", str(config)],
        stderr=subprocess.DEVNULL,
    )


def test_replayed_status_and_heartbeats_do_not_keep_a_dead_device_online(site, broker, mock_factory):
    site.add_device("cp-dead", body='[[buttons]]\nname = "help"\npin = 17\n[telemetry]\ninterval_s = 5\n')
    events = []
    recorder = Recorder(broker, "edge/demo-site/cp-dead/#")
    with Receiver(receiver_config(site), on_device_event=events.append) as receiver:
        agent = run_agent(site, "cp-dead")
        try:
            assert wait_until(lambda: recorder.channel("status") and recorder.channel("telemetry"), 20)
        finally:
            agent.kill()  # the power is cut
            agent.wait()
        killed_at = time.monotonic()
        captured = recorder.channel("status")[:1] + recorder.channel("telemetry")
        while not [e for e in events if e.event == "missing"] and time.monotonic() - killed_at < SUPERVISION_S + 5:
            recorder.replay(captured)  # an attacker keeps the device "alive" with what it said before
            time.sleep(1)
        missing = [e for e in events if e.event == "missing"]
        assert missing, f"no missing alarm while replays went on: {receiver.counters}"
        assert time.monotonic() - killed_at <= SUPERVISION_S + 3
        assert receiver.counters["duplicate"] + receiver.counters["stale"] + receiver.counters["old_status"] > 0
        recorder.replay(captured)
        time.sleep(1.5)
        assert [e.event for e in events] == ["missing"]  # no "back" from a replay
    recorder.close()


def test_a_new_receiver_reads_the_last_will_as_offline_not_as_back(site, broker, mock_factory):
    site.add_device("cp-will", body='[[buttons]]\nname = "help"\npin = 17\n')
    config = receiver_config(site)
    first_events = []
    with Receiver(config, on_device_event=first_events.append) as receiver:
        agent = run_agent(site, "cp-will")
        try:
            assert wait_until(lambda: any(s.device == "cp-will" for s in receiver.registry.states()), 20)
        finally:
            agent.kill()
            agent.wait()
        # The broker notices the dead connection after the keep-alive and publishes the retained will.
        assert wait_until(
            lambda: any(s.device == "cp-will" and s.status == "offline" for s in receiver.registry.states()), 60
        )
        assert wait_until(lambda: [e.event for e in first_events] == ["missing"], SUPERVISION_S + 5)
    events = []
    with Receiver(config, on_device_event=events.append) as fresh:  # a receiver started later reads the will
        assert fresh.link.wait_subscribed(10)
        time.sleep(1.5)
        (state,) = [s for s in fresh.registry.states() if s.device == "cp-will"]
        assert (state.status, state.missing) == ("offline", True)
        assert [e for e in events if e.event == "back"] == []
