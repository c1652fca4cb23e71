"""Where the receiver forwards verified events: alarm receiving centres (ARCs) over SIA DC-09.

Each ``[[forward.arc]]`` names one ARC: its primary and backup address, the receiver and line
numbers it expects, the key (a file holding hex, from the credentials directory), the supervision
interval, which account and zone each site or device reports as, and the Contact ID code of each
kind of event (``docs/dc09.md`` has the table and why each code).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from agent.config.base import Name, Section

Account = Annotated[
    str, Field(pattern=r"^[0-9A-F]{3,16}$", description="DC-09 account: 3-16 hex digits (A-F upper case).")
]
HexNumber = Annotated[str, Field(pattern=r"^[0-9A-F]{1,6}$")]


def split_host_port(value: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" → (host, port); ValueError saying what is wrong otherwise."""
    host, colon, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f'{value!r} is not host:port (for example "arc.example.net:5000")')
    return host, int(port)


class ArcAccount(Section):
    """Which account (and zone) a site, or one device of it, reports as."""

    site: Name = Field(description="The site whose events this account reports.")
    device: Name | None = Field(None, description="One device of the site; unset: every device of the site.")
    account: Account
    zone: int = Field(1, ge=0, le=999, description="Contact ID zone (SIA: zone) the device reports as.")
    partition: int = Field(1, ge=0, le=99, description="Contact ID group/partition (SIA: area).")


class ArcCodes(Section):
    """Contact ID (SIA DC-05) event codes by kind of event; test alerts always use ``test``."""

    alert: int = Field(120, ge=100, le=999, description="A button alert (DC-05 120 Panic).")
    duress: int = Field(121, ge=100, le=999, description="A button whose alert_kind is 'duress' (121 Duress).")
    silent: int = Field(122, ge=100, le=999, description="Any other silent button (122 Silent panic).")
    camera: int = Field(140, ge=100, le=999, description="A camera detection rule firing (140 General alarm).")
    tamper: int = Field(137, ge=100, le=999, description="A device's tamper switch (137 Tamper).")
    test: int = Field(601, ge=600, le=699, description="Test alerts (601 Manual trigger test report).")
    missing: int = Field(
        350,
        ge=300,
        le=399,
        description="Device missing (qualifier 1) and back (qualifier 3): 350 Communication trouble.",
    )
    alert_kinds: dict[str, int] = Field(
        default_factory=dict, description="Codes by a button's alert_kind, e.g. {fire = 110, medical = 100}."
    )

    @field_validator("alert_kinds")
    @classmethod
    def _codes(cls, value: dict[str, int]) -> dict[str, int]:
        for kind, code in value.items():
            if not 100 <= code <= 999 or 600 <= code <= 699:
                raise ValueError(f"alert_kind {kind!r}: {code} is not an alarm code (100-999, tests are 6xx)")
        return value


class ArcSection(Section):
    """One alarm receiving centre and how the centre's events reach it."""

    name: Name = Field(description="A name for logs, metrics and 'receiver forwarders'.")
    primary: str = Field(description='The ARC\'s DC-09 receiver, "host:port" (TCP).')
    backup: str | None = Field(
        None, description="A second path to the ARC (EN 50136-1 dual path), tried when the primary fails."
    )
    protocol: Literal["ADM-CID", "SIA-DCS"] = Field("ADM-CID", description="Contact ID (DC-05) or SIA DC-03 events.")
    receiver_number: HexNumber = Field("0", description="DC-09 receiver number (R), as the ARC assigned.")
    line_number: HexNumber = Field("0", description="DC-09 line number (L), as the ARC assigned.")
    key_file: str | None = Field(
        None, description="AES key (32, 48 or 64 hex digits) in a credentials file; unset: not encrypted."
    )
    null_interval_s: float = Field(
        60.0, ge=0.05, le=86400, description="Supervision: a NULL message when nothing was sent for this long."
    )
    ack_timeout_s: float = Field(10.0, gt=0, le=120, description="No answer within this long: the path failed.")
    retry_first_s: float = Field(1.0, gt=0, le=600, description="First wait after a NAK, DUH or failed path.")
    retry_max_s: float = Field(60.0, gt=0, le=3600, description="Longest wait between attempts.")
    primary_retry_s: float = Field(
        60.0, gt=0, le=86400, description="While on the backup, try the primary again this often."
    )
    default_account: Account | None = Field(
        None, description="Account for sites not listed in accounts; unset: not forwarded."
    )
    accounts: list[ArcAccount] = Field(default_factory=list, description="Accounts by site or device.")
    codes: ArcCodes = Field(default_factory=ArcCodes)

    @field_validator("primary", "backup")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    @model_validator(mode="after")
    def _retries(self) -> ArcSection:
        if self.retry_max_s < self.retry_first_s:
            raise ValueError(f"retry_max_s ({self.retry_max_s:g}) is less than retry_first_s ({self.retry_first_s:g})")
        return self

    def account_for(self, site: str, device: str) -> ArcAccount | None:
        """The device's own entry, else its site's, else the default account (zone 1), else None."""
        for entry in self.accounts:
            if entry.site == site and entry.device == device:
                return entry
        for entry in self.accounts:
            if entry.site == site and entry.device is None:
                return entry
        if self.default_account is None:
            return None
        return ArcAccount(site=site, account=self.default_account)


class HomeAssistantSection(Section):
    """A plain JSON feed of verified events with Home Assistant MQTT discovery (never the signed originals)."""

    enabled: bool = Field(False, description="Publish the feed (on the receiver's broker, under its own client id).")
    discovery_prefix: str = Field(
        "homeassistant", pattern=r"^[A-Za-z0-9_-]+$", description="Home Assistant's discovery prefix."
    )
    topic_prefix: str = Field("edge-feed", pattern=r"^[A-Za-z0-9_-]+$", description="Where states and events go.")
    include_silent: bool = Field(
        False, description="Also publish silent (duress) alerts; off: a silent alert never shows in home automation."
    )


class ForwardSection(Section):
    arc: list[ArcSection] = Field(default_factory=list, description="Alarm receiving centres fed over SIA DC-09.")
    home_assistant: HomeAssistantSection = Field(default_factory=HomeAssistantSection)

    @field_validator("arc")
    @classmethod
    def _unique_names(cls, value: list[ArcSection]) -> list[ArcSection]:
        names = [arc.name for arc in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"ARC name(s) used twice: {', '.join(repeated)}")
        return value
