"""The ``[mqtt]`` section both sides share: broker, login, TLS, reconnect."""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from agent.config.base import Section


class TlsSection(Section):
    enabled: bool = Field(True, description="Use TLS with server certificate verification.")
    ca_file: str | None = Field(
        None,
        description="CA bundle (PEM) for the broker; the system store when unset. A relative name is looked up "
        "like a secret: $CREDENTIALS_DIRECTORY, then credentials_dir, then state_dir.",
    )
    cert_file: str | None = Field(None, description="Client certificate (PEM) for mutual TLS; looked up like ca_file.")
    key_file: str | None = Field(
        None, description="Client certificate key (PEM) for mutual TLS; a secret file, looked up like ca_file."
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsSection:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together for a client certificate")
        return self


class BrokerAddress(str):
    """'host' or 'host:port' (IPv6 as '[addr]:port')."""

    _PATTERN = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+))(?::(?P<port>\d{1,5}))?$")

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(cls._check, core_schema.str_schema(min_length=1))

    @classmethod
    def _check(cls, value: str) -> BrokerAddress:
        match = cls._PATTERN.match(value)
        if match is None or (match["port"] and not 1 <= int(match["port"]) <= 65535):
            raise ValueError(f"{value!r} is not 'host' or 'host:port'")
        return cls(value)

    def split(self, default_port: int) -> tuple[str, int]:
        match = self._PATTERN.match(self)
        return (match["v6"] or match["host"], int(match["port"]) if match["port"] else default_port)


class MqttSection(Section):
    host: str = Field(min_length=1, description="Broker host name or address.")
    port: int = Field(8883, ge=1, le=65535, description="Broker port (8883 for TLS, 1883 plain).")
    topic_prefix: str = Field(
        "edge", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", description="First topic levels."
    )
    keepalive_s: int = Field(30, ge=5, le=300, description="MQTT keep-alive; path loss is noticed within 1.5x this.")
    client_id: str | None = Field(None, description="MQTT client id; the device id when unset.")
    username: str | None = Field(None, description="Broker user name.")
    password_file: str | None = Field(
        None, description="File holding the broker password (never inline); looked up like tls.ca_file."
    )
    reconnect_min_s: float = Field(0.5, gt=0, le=60, description="First reconnect delay.")
    reconnect_max_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="Cap of the exponential reconnect delay: low, so the first resend after an outage is prompt.",
    )
    tls: TlsSection = Field(default_factory=TlsSection)
    fallback: list[BrokerAddress] = Field(
        default_factory=list,
        max_length=8,
        description="Further brokers, in order, as 'host' or 'host:port' (the port defaults to port): a device fails "
        "over when its broker is gone and returns to the first one when it is back; a receiver connects to all.",
    )
    primary_check_s: float = Field(
        30.0, ge=1, le=3600, description="While on a fallback broker, how often the first one is tried again."
    )

    @property
    def brokers(self) -> list[tuple[str, int]]:
        """Every broker in order of preference, as (host, port)."""
        return [(self.host, self.port), *(address.split(self.port) for address in self.fallback)]

    @model_validator(mode="after")
    def _consistent(self) -> MqttSection:
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file must be given with username")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s ({self.reconnect_min_s}) must not exceed reconnect_max_s ({self.reconnect_max_s})"
            )
        return self
