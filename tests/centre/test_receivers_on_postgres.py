"""Several receiver processes on one PostgreSQL: one killed mid-burst, every alert stored once, raised once, acknowledged.

The receivers run as separate processes on this machine (the multi-host case differs only in where the
processes run: they share the broker's group and the database, nothing else).
"""

import pytest

from tests import faultplans
from tests.agent.test_faults import LATENCY_TARGET_S, _run, assert_exactly_once
from tests.centre.test_store_backends import fresh_database


@pytest.fixture
def centre_database(postgres) -> str:
    pytest.importorskip("psycopg")
    return f'database = "{fresh_database(postgres)}"\n'


def test_two_receivers_on_postgres_one_killed_for_good(tmp_path, centre_database):
    report = _run(faultplans.receiver_lost, tmp_path, alerts=80, rate=10.0, receiver_settings=centre_database)
    assert_exactly_once(report)  # stored once, raised once across both receivers' logs, none lost
    assert report.p99_s <= LATENCY_TARGET_S, report


def test_a_receiver_on_postgres_killed_and_restarted_mid_burst(tmp_path, centre_database):
    report = _run(faultplans.receiver_kills, tmp_path, alerts=80, rate=10.0, kills=1, receiver_settings=centre_database)
    assert_exactly_once(report)
    assert report.p99_s <= LATENCY_TARGET_S, report
