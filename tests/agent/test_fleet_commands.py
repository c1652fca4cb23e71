"""The centre's signed commands on real parts: answered and audited, refused when forged, stale or replayed."""

import json
import time

import pytest

from agent.cli import main
from agent.device import commands
from agent.device.agent import Agent
from agent.mqtt.link import MqttLink
from agent.protocol.commands import sign_command
from agent.protocol.messages import TopicLayout
from agent.protocol.signing import MessageSigner, generate_private_key, load_private_key
from tests.conftest import agent_run_argv, wait_until

BUTTONS = '[[buttons]]\nname = "help"\npin = 17\nlocation = "North gate"\n'


@pytest.fixture
def config(site):
    return site.add_device("cp-1", body=BUTTONS)


@pytest.fixture
def agent(config, mock_factory):
    with Agent(config, pin_factory=mock_factory) as running:
        assert running.link.wait_subscribed(10)
        yield running


def answers(store) -> list[dict]:
    return [m.claims["body"]["command"] for m in store.messages(kind="event") if "command" in m.claims["body"]]


def command(site, name: str, capsys) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["centre", "command", name, "--device", "cp-1", "--config", str(site.receiver_toml_path())])
    out = capsys.readouterr().out
    return code, json.loads(out) if out else {}


def publish(site, topic: str, token: str) -> None:
    link = MqttLink(site.receiver_config.mqtt, client_id="test-publisher", secret_dirs=site.receiver_config.secret_dirs)
    assert link.probe(10) is None
    try:
        link.publish(topic, token.encode(), qos=1)
        time.sleep(0.2)  # let paho flush the packet before the link goes
    finally:
        link.close()


def test_selftest_and_test_alert_are_answered_signed_and_audited(site, receiver, agent, capsys):
    code, answer = command(site, "selftest", capsys)
    assert code == 0 and answer["outcome"] == "done"
    checks = {row["check"]: row for row in answer["result"]["checks"]}
    assert checks["button help"]["ok"] and checks["mqtt"]["ok"] and checks["outbox"]["ok"]
    code, answer = command(site, "test-alert", capsys)
    assert code == 0
    assert wait_until(lambda: receiver.store.messages(kind="alert"), 10)
    (alert,) = receiver.store.messages(kind="alert")
    assert alert.test and alert.seq == answer["result"]["seq"]
    assert wait_until(lambda: len(answers(receiver.store)) == 2, 10)  # the centre's store: the audit of answers
    log = [
        json.loads(line) for line in (site.receiver_config.receiver.state_dir / "commands.log").read_text().splitlines()
    ]
    assert [(r["command"], r["step"]) for r in log] == [
        ("selftest", "sent"),
        ("selftest", "answered"),
        ("test-alert", "sent"),
        ("test-alert", "answered"),
    ]


def test_restart_is_refused_by_an_agent_that_cannot_restart_itself(site, receiver, agent, capsys):
    code, answer = command(site, "restart", capsys)
    assert code == 1 and answer["outcome"] == "refused" and answer["reason"].startswith("unsupported")
    assert not agent.restart_requested


def test_forged_stale_and_replayed_commands_are_refused_even_after_a_restart(
    site, receiver, agent, config, mock_factory, tmp_path, monkeypatch
):
    monkeypatch.setattr(commands, "REFUSAL_REPORT_S", 0.0)  # every refusal reported: this test reads them all
    topic = TopicLayout(site.prefix).topic(site.site, "cp-1", "command")
    rc = site.receiver_config
    centre = MessageSigner(load_private_key(rc.secret_dirs[0] / rc.receiver.signing_key_file))
    impostor = MessageSigner(generate_private_key(tmp_path / "impostor.pem"))
    now = time.time()
    genuine, _ = sign_command(centre, device="cp-1", site=site.site, command="selftest", sent=now, lifetime_s=600)
    publish(site, topic, genuine)
    assert wait_until(lambda: [a for a in answers(receiver.store) if a["outcome"] == "done"], 10)
    cases = [
        (genuine, "replayed"),
        (sign_command(impostor, device="cp-1", site=site.site, command="selftest", sent=now, lifetime_s=60)[0], "bad_signature"),
        (sign_command(centre, device="cp-1", site=site.site, command="selftest", sent=now - 7200, lifetime_s=60)[0], "stale"),
        (sign_command(centre, device="cp-2", site=site.site, command="selftest", sent=now, lifetime_s=60)[0], "device_mismatch"),
    ]  # fmt: skip
    for n, (token, reason) in enumerate(cases, start=1):
        publish(site, topic, token)
        assert wait_until(lambda n=n: len([a for a in answers(receiver.store) if a["outcome"] == "refused"]) == n, 10)
        assert [a for a in answers(receiver.store) if a["outcome"] == "refused"][-1]["reason"].startswith(reason)
    agent.close()
    with Agent(config, pin_factory=mock_factory) as restarted:  # the used ids are on disk: still single use
        assert restarted.link.wait_subscribed(10)
        publish(site, topic, genuine)
        assert wait_until(lambda: restarted.commands.counters["refused_replayed"] == 1, 10)


def test_restart_command_restarts_edge_agent_run(site, receiver, config, capsys):
    import subprocess

    from agent.device.control import request
    from agent.errors import ControlError

    def status() -> dict:
        try:
            return request(config.control_socket, "status")
        except ControlError:
            return {}  # between two runs, or not up yet

    command_line = agent_run_argv(site.device_config_path("cp-1"))
    process = subprocess.Popen(command_line, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: status().get("connected"), 30)
        first_pid_uptime = status()["uptime_s"]
        time.sleep(1.0)  # deliberate: the restarted agent's uptime must be visibly smaller
        code, answer = command(site, "restart", capsys)
        assert code == 0 and answer["outcome"] == "done"

        def restarted() -> bool:
            now = status()  # one reading: a second one could land in the middle of the restart
            return bool(now.get("connected")) and now.get("uptime_s", float("inf")) < first_pid_uptime + 1.0

        assert wait_until(restarted, 30)
        assert process.poll() is None  # the same process: 'edge-agent run' started the agent again
    finally:
        process.terminate()
        process.wait(timeout=30)
