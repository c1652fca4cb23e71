"""The map: devices where provisioning put them, drawn with no map service, or over the city's tiles."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from agent.config.centre import ConsoleSection
from agent.console.fleet import FleetRow
from agent.console.map import HEIGHT, WIDTH, map_layers, mercator
from agent.console.server import Console
from agent.protocol.enrolment import EnrolledDevice, Position

PLACES = {"cp-1": (48.8566, 2.3522), "cp-2": (48.8606, 2.3376), "cp-3": (48.8530, 2.3499)}


def fleet(state: str = "online") -> tuple[list[FleetRow], dict[str, EnrolledDevice]]:
    rows = [FleetRow("paris", d, "call-point", state, None, 0, None, None, None, None, [], True) for d in PLACES]
    devices = {
        d: EnrolledDevice(d, "paris", "call-point", "kid", None, Position(lat=lat, lon=lon))
        for d, (lat, lon) in PLACES.items()
    }
    devices["cp-4"] = EnrolledDevice("cp-4", "paris", "call-point", "kid", None, Position(plan="hall", x=3.0, y=4.0))
    rows.append(FleetRow("paris", "cp-4", "call-point", "missing", None, 0, None, None, None, None, [], True))
    return rows, devices


def inside(point) -> bool:
    return 0 <= point.x <= WIDTH and 0 <= point.y <= HEIGHT


def test_without_a_tile_server_positions_are_drawn_on_a_plain_projection_and_site_plans():
    geo, plan = map_layers(*fleet(), plans_dir=None)
    assert geo.tiles == [] and {p.device for p in geo.points} == set(PLACES) and all(map(inside, geo.points))
    west, east = (next(p for p in geo.points if p.device == d) for d in ("cp-2", "cp-1"))
    assert west.x < east.x  # west is left
    assert plan.title == "Site plan hall" and plan.points[0].state == "missing" and inside(plan.points[0])


def test_over_the_citys_tiles_every_device_lands_on_a_tile_that_is_drawn():
    url = "https://tiles.city.example/{z}/{x}/{y}.png"
    geo = map_layers(*fleet(), plans_dir=None, tiles_url=url)[0]
    zoom = int(geo.title.split("zoom ")[1].rstrip(")"))
    assert 12 <= zoom <= 19  # a few km of city: street level, not the whole world
    assert all(map(inside, geo.points))
    assert all(u.startswith(f"https://tiles.city.example/{zoom}/") for u, _, _ in geo.tiles)
    for point in geo.points:
        assert any(x <= point.x < x + 256 and y <= point.y < y + 256 for _, x, y in geo.tiles)
    x1, y1 = mercator(48.8566, 2.3522, zoom)
    x2, y2 = mercator(48.8606, 2.3376, zoom)
    drawn = {p.device: p for p in geo.points}
    assert drawn["cp-2"].x - drawn["cp-1"].x == pytest.approx(x2 - x1, abs=0.2)
    assert drawn["cp-2"].y - drawn["cp-1"].y == pytest.approx(y2 - y1, abs=0.2)


def test_a_tile_server_must_be_an_http_url_template_and_is_the_only_other_image_source(site):
    with pytest.raises(ValidationError, match=r"with \{z\}, \{x\} and \{y\}"):
        ConsoleSection(map_tiles_url="file:///etc/passwd")
    section = ConsoleSection(map_tiles_url="https://tiles.city.example:8443/{z}/{x}/{y}.png")
    assert section.tiles_origin == "https://tiles.city.example:8443"
    config = site.receiver_config.model_copy(update={"console": section})
    with Console(config, listen="127.0.0.1:0") as console:
        console.start()
        policy = httpx.get(console.url + "login").headers["content-security-policy"]
    assert "img-src 'self' https://tiles.city.example:8443 data:;" in policy and "script-src 'self';" in policy


def test_the_fleet_shows_each_devices_software_and_configuration_and_safe_mode(tmp_path):
    """Issue 14's fleet view: software version, pushed configuration version, safe mode (which needs a look)."""
    from agent.centre.keyring import Keyring
    from agent.centre.store import ReceiverStore
    from agent.console.fleet import fleet_rows
    from agent.console.state import ConsoleState
    from agent.protocol.messages import MessageClaims, new_claims

    keyring = Keyring(tmp_path / "keyring")
    with ReceiverStore(tmp_path / "r.sqlite") as store:
        registry = store.registry(90)
        for device, body in {
            "cp-1": {"version": "0.2.0", "config_version": 1764000000000},
            "cp-2": {"version": "0.1.0", "config_version": 0, "safe_mode": "safe mode (minimal): [tamper] pin: bad"},
        }.items():
            claims = new_claims(device=device, site="paris", seq=1, kind="telemetry", body=body)
            registry.heard(MessageClaims.model_validate(claims), now=1000.0)
        rows = {r.device: r for r in fleet_rows(store, ConsoleState(store), keyring, 90, now=1001.0)}
    assert (rows["cp-1"].version, rows["cp-1"].config_version, rows["cp-1"].safe_mode) == ("0.2.0", 1764000000000, None)
    assert rows["cp-2"].safe_mode.startswith("safe mode") and rows["cp-2"].needs_look
