"""Enrolment records with and without a position: validated, kept by the keyring, old records still valid."""

import json
import math

import pytest

from agent.centre.keyring import Keyring
from agent.errors import KeyFileError
from agent.protocol.enrolment import Position, enrolment_record, parse_record
from agent.protocol.signing import generate_private_key


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return generate_private_key(tmp_path_factory.mktemp("enrolment") / "device.pem")


def test_a_record_without_position_stays_valid(key):
    record = enrolment_record("cp-1", "site-a", "call-point", key)
    assert "position" not in record and "location" not in record
    device = parse_record(record, "old record")
    assert device.position is None and device.location == ""


@pytest.mark.parametrize(
    "position",
    [
        Position(lat=59.9139, lon=10.7522),
        Position(plan="ground-floor", x=12.5, y=-3.0),
        Position(lat=-90.0, lon=180.0, plan="site", x=0.0, y=0.0),
    ],
)
def test_positions_survive_the_record_and_the_keyring(key, tmp_path, position):
    record = enrolment_record("cp-1", "site-a", "call-point", key, position=position, location="North gate")
    keyring = Keyring(tmp_path / "keyring")
    keyring.enroll(json.loads(json.dumps(record)))
    (device,) = Keyring(tmp_path / "keyring").devices()  # read back from the file, by a fresh keyring
    assert device.position == position and device.location == "North gate"


def test_plan_coordinates_without_a_plan_name_are_on_the_default_plan(key):
    record = {**enrolment_record("cp-1", "site-a", "call-point", key), "position": {"x": 1, "y": 2}}
    assert parse_record(record, "r").position == Position(plan="site", x=1.0, y=2.0)


@pytest.mark.parametrize(
    ("position", "complaint"),
    [
        ({"lat": 91, "lon": 0}, "outside"),
        ({"lat": 0, "lon": -180.5}, "outside"),
        ({"lat": 10}, "both lat and lon"),
        ({"x": 1}, "both lat and lon, or both x and y"),
        ({"lat": math.nan, "lon": 0}, "not a finite number"),
        ({"lat": "59.9", "lon": 10}, "not a finite number"),
        ({"lat": True, "lon": 10}, "not a finite number"),
        ({"x": 1e8, "y": 0}, "outside"),
        ({"plan": "roof"}, "no x and y"),
        ({"plan": "../etc", "x": 1, "y": 1}, "not a valid name"),
        ({"lat": 1, "lon": 1, "who": "Jane"}, "is an object with"),
        ({}, "is an object with"),
        ([59.9, 10.7], "is an object with"),
    ],
)
def test_bad_positions_are_refused(key, position, complaint):
    record = {**enrolment_record("cp-1", "site-a", "call-point", key), "position": position}
    with pytest.raises(KeyFileError, match=complaint):
        parse_record(record, "record")


@pytest.mark.parametrize("location", [42, "x" * 201])
def test_bad_location_text_is_refused(key, location):
    record = {**enrolment_record("cp-1", "site-a", "call-point", key), "location": location}
    with pytest.raises(KeyFileError, match="location"):
        parse_record(record, "record")
