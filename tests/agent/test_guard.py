"""A long-lived loop outlives its own surprises, and the watchdog sees a loop that died or got stuck."""

import logging
import threading

from agent.runtime.backoff import Backoff
from agent.runtime.guard import LoopGuard
from tests.conftest import wait_until


def test_a_surprise_ends_the_step_not_the_loop_and_is_logged_once(caplog):
    guard = LoopGuard("worker")
    done = threading.Event()

    def loop():
        for number in range(5):
            guard.beat()
            with guard.step("parse"):
                raise ValueError(f"bad input {number}")
        done.set()

    with caplog.at_level(logging.ERROR, logger="agent.runtime.guard"):
        guard.start(loop)
        assert done.wait(5)
    assert guard.errors == {"parse: ValueError": 5}
    assert len([r for r in caplog.records if "unexpected error in parse" in r.getMessage()]) == 1
    assert guard.report() == {"alive": False, "errors": {"parse: ValueError": 5}}


def test_a_loop_that_stopped_or_stopped_beating_is_a_problem():
    stopped = LoopGuard("short-lived")
    stopped.start(lambda: None)
    assert wait_until(lambda: stopped.problem() == "short-lived thread stopped", 5)

    release = threading.Event()
    stuck = LoopGuard("stuck", stall_s=0.2)
    stuck.start(lambda: release.wait(10))  # alive, but not beating
    assert wait_until(lambda: (stuck.problem() or "").startswith("stuck thread stuck for"), 5)
    release.set()

    assert LoopGuard("never started").problem() is None


def test_backoff_doubles_up_to_its_cap_and_starts_again_after_a_reset():
    retry = Backoff(1.0, 5.0)
    assert [retry.next() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    retry.reset()
    assert retry.next() == 1.0
    jittered = Backoff(2.0, 2.0, jitter=True)
    assert all(1.0 <= jittered.next() <= 2.0 for _ in range(100))
