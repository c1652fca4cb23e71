"""The receiver's Prometheus endpoint, scraped over HTTP while a real call point and a forger talk to it."""

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.centre.keyring import Keyring
from agent.centre.metrics import MetricsOff, ReceiverMetrics, figure
from agent.centre.receiver import Receiver
from agent.centre.store import ReceiverStore
from agent.config.centre import ReceiverConfig
from agent.device.agent import Agent
from agent.errors import ConfigError
from agent.mqtt.link import MqttLink
from agent.protocol.messages import new_claims
from agent.protocol.signing import MessageSigner, generate_private_key, load_private_key
from tests.conftest import wait_until

BUTTON = '[[buttons]]\nname = "help"\npin = 17\nlocation = "North gate"\n'


def with_metrics(config: ReceiverConfig, listen: str = "127.0.0.1:0") -> ReceiverConfig:
    return config.model_copy(update={"receiver": config.receiver.model_copy(update={"metrics_listen": listen})})


def scrape(receiver: Receiver) -> dict[tuple[str, tuple], float]:
    """Every sample on the endpoint, keyed by (name, sorted labels)."""
    host, port = receiver.metrics.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def signer_of(site, device_id: str) -> MessageSigner:
    config = site.add_device(device_id, body=BUTTON)
    return MessageSigner(load_private_key(config.secret_dirs[0] / config.identity.private_key_file))


@pytest.fixture
def metered(site, verdicts):
    with Receiver(with_metrics(site.receiver_config), on_verdict=verdicts) as running:
        assert running.link.wait_subscribed(10)
        yield running


def test_scrape_counts_outcomes_answers_latency_and_the_fleet(site, metered, verdicts, mock_factory, tmp_path):
    call_point = site.add_device("cp-1", body=BUTTON)
    cp2 = signer_of(site, "cp-2")  # a device the test speaks for: a late alert, a stale one, a camera's telemetry
    signer_of(site, "cp-3")  # enrolled, never heard
    stranger = MessageSigner(generate_private_key(tmp_path / "stranger.pem"))
    with Agent(call_point, pin_factory=mock_factory) as agent:
        assert agent.link.wait_connected(10)
        pin = mock_factory.pin(17)
        pin.drive_low()
        pin.drive_high()
        assert wait_until(lambda: agent.delivery.stats.acknowledged >= 1, 10)
        assert wait_until(lambda: verdicts.accepted("telemetry"), 10)  # the agent's first heartbeat
        with MqttLink(site.receiver_config.mqtt, client_id="tester", secret_dirs=(tmp_path,)) as link:
            link.start()
            assert link.wait_connected(10)
            now = time.time()
            forged = new_claims(device="cp-x", site=site.site, seq=1, kind="alert", body={})
            link.publish(f"edge/{site.site}/cp-x/alert", stranger.sign(forged).encode())
            late = new_claims(device="cp-2", site=site.site, seq=1, kind="alert", body={}, created=now - 3)
            link.publish(f"edge/{site.site}/cp-2/alert", cp2.sign({**late, "sent": now}).encode())
            stale = new_claims(device="cp-2", site=site.site, seq=2, kind="alert", body={}, created=now - 100)
            link.publish(f"edge/{site.site}/cp-2/alert", cp2.sign(stale).encode())
            body = {"outbox_depth": 4, "oldest_unsent_s": 12.5, "vision": {"inference_ms_avg": 80.0}}
            telemetry = new_claims(device="cp-2", site=site.site, seq=3, kind="telemetry", body=body)
            link.publish(f"edge/{site.site}/cp-2/telemetry", cp2.sign(telemetry).encode())
            assert wait_until(lambda: len(verdicts.accepted("telemetry")) >= 2, 10)
            assert wait_until(lambda: len(verdicts.with_outcome("rejected")) >= 2, 10)
        samples = scrape(metered)

    messages = "edge_agent_receiver_messages_total"
    assert sample(samples, messages, outcome="accepted", reason="", kind="alert") == 2
    assert sample(samples, messages, outcome="rejected", reason="unknown_device", kind="unknown") == 1
    assert sample(samples, messages, outcome="rejected", reason="stale", kind="alert") == 1
    assert sample(samples, "edge_agent_receiver_answers_total", kind="ack", reason="stored") == 2
    assert sample(samples, "edge_agent_receiver_answers_total", kind="nak", reason="stale") == 1
    latency = "edge_agent_receiver_press_to_store_seconds"
    assert sample(samples, f"{latency}_count", kind="alert") == 2
    assert sample(samples, f"{latency}_bucket", kind="alert", le="2.5") == 1  # the press, not the late one
    assert sample(samples, f"{latency}_bucket", kind="alert", le="5.0") == 2
    assert sample(samples, "edge_agent_receiver_store_errors_total") == 0
    cp1, cp2_labels = {"device": "cp-1", "site": site.site}, {"device": "cp-2", "site": site.site}
    assert sample(samples, "edge_agent_device_outbox_depth", **cp1) is not None
    assert sample(samples, "edge_agent_device_inference_seconds", **cp1) is None  # a call point has no detector
    assert sample(samples, "edge_agent_device_outbox_depth", **cp2_labels) == 4
    assert sample(samples, "edge_agent_device_oldest_unsent_seconds", **cp2_labels) == 12.5
    assert sample(samples, "edge_agent_device_inference_seconds", **cp2_labels) == pytest.approx(0.08)
    assert sample(samples, "edge_agent_devices", state="online") == 2
    assert sample(samples, "edge_agent_devices", state="never_seen") == 1
    assert sample(samples, "edge_agent_devices", state="missing") == 0
    assert dashboard_metric_names() <= {name for name, _ in samples}  # the sample dashboard's queries find data


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((Path(__file__).parents[2] / "docs" / "grafana-centre.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return set(re.findall(r"edge_agent_[a-z_]+", " ".join(queries)))


def test_the_agents_last_will_shows_it_offline(site, metered, mock_factory):
    with Agent(site.add_device("cp-1", body=BUTTON), pin_factory=mock_factory) as agent:
        assert agent.link.wait_connected(10)
        assert wait_until(lambda: sample(scrape(metered), "edge_agent_devices", state="online") == 1, 10)
    assert wait_until(lambda: sample(scrape(metered), "edge_agent_devices", state="offline") == 1, 10)


def test_enrolment_requests_are_counted_by_outcome(site, metered):
    """A zero-touch request that is not one is refused, and the scrape says why."""
    config = site.receiver_config
    link = MqttLink(config.mqtt, client_id="enrol-probe", secret_dirs=config.secret_dirs)
    assert link.probe(10) is None
    try:
        link.publish(f"{site.prefix}/_enrol/box-1/request", b"not a request", qos=1)
        counted = "edge_agent_receiver_enrolments_total"
        assert wait_until(lambda: sample(scrape(metered), counted, outcome="malformed") == 1, 10)
    finally:
        link.close()


def test_metrics_are_off_unless_configured(site):
    with Receiver(site.receiver_config) as running:
        assert isinstance(running.metrics, MetricsOff) and running.metrics.address is None


def test_two_receivers_in_one_process_keep_their_own_metrics(site):
    config = site.receiver_config
    with ReceiverStore(config.database_path) as store:
        fleet = (store.registry(config.receiver.supervision_s), Keyring(config.keyring_path))
        first, second = ReceiverMetrics(("127.0.0.1", 0), *fleet), ReceiverMetrics(("127.0.0.1", 0), *fleet)
        first.store_errors.inc()
    assert first.registry.get_sample_value("edge_agent_receiver_store_errors_total") == 1
    assert second.registry.get_sample_value("edge_agent_receiver_store_errors_total") == 0


def test_an_address_in_use_fails_the_start_saying_where(site):
    with Receiver(with_metrics(site.receiver_config)) as first:
        host, port = first.metrics.address
        taken = with_metrics(site.receiver_config, f"{host}:{port}")
        second = Receiver(taken)
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            second.start()
        second.close()


@pytest.mark.parametrize("listen", ["9464", "localhost:", ":9464", "host:99999", "host:http"])
def test_a_bad_listen_address_is_a_config_error(site, listen):
    with pytest.raises(ValueError, match="is not host:port"):
        ReceiverConfig.model_validate({**site.receiver_config.model_dump(), "receiver": {"metrics_listen": listen}})


def test_listen_addresses_accepted():
    from agent.config.centre import split_listen_address

    assert split_listen_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert split_listen_address("[::1]:9464") == ("::1", 9464)
    assert split_listen_address("0.0.0.0:0") == ("0.0.0.0", 0)


@pytest.mark.parametrize(
    "body",
    [
        None,
        "text",
        {"outbox_depth": "4"},
        {"outbox_depth": True},
        {"outbox_depth": 10**400},
        {"outbox_depth": float("nan")},
        {"outbox_depth": [4]},
    ],
)
def test_hostile_telemetry_figures_are_left_out(body):
    assert figure(body, ("outbox_depth",)) is None


def test_a_nested_figure_is_read():
    assert figure({"vision": {"inference_ms_avg": 12}}, ("vision", "inference_ms_avg")) == 12.0
    assert figure({"vision": None}, ("vision", "inference_ms_avg")) is None
