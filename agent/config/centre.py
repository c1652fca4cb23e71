"""The centre's receiver configuration."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from agent.config.base import Name, Section
from agent.config.fields import ConfigRelativePath
from agent.config.forward import ForwardSection
from agent.config.loading import load_model
from agent.config.mqtt import MqttSection

#: How a PostgreSQL DSN (URI form) begins; anything else in ``database`` is an SQLite file.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class ReceiverSection(Section):
    id: Name = Field("centre", description="Receiver id, put in acknowledgements.")
    state_dir: ConfigRelativePath = Field(
        Path("/var/lib/edge-agent-receiver"), description="Database, keyring and keys."
    )
    credentials_dir: ConfigRelativePath = Field(
        Path("/etc/edge-agent/credentials"), description="Where the centre's key and passwords live."
    )
    keyring_dir: str = Field("keyring", description="Directory of enrolled device keys, relative to state_dir.")
    database: str = Field(
        "receiver.sqlite",
        description="Accepted messages: a PostgreSQL DSN (postgresql://user@host/db; keep passwords in ~/.pgpass"
        " or PGPASSFILE, not here), or an SQLite file, relative to state_dir.",
    )
    signing_key_file: str = Field("centre-key.pem", description="The centre's Ed25519 key for acknowledgements.")
    encryption_key_file: str = Field(
        "centre-enc-key.pem", description="The centre's X25519 key; devices encrypt evidence images for it."
    )
    share_group: Name = Field("centre", description="MQTT 5 shared-subscription group; receivers share the load.")
    window_past_s: float = Field(40.0, gt=0, le=3600, description="Oldest accepted send time (SIA DC-09: 40 s).")
    window_future_s: float = Field(20.0, gt=0, le=3600, description="Furthest accepted future send time (20 s).")
    supervision_s: float = Field(
        90.0, ge=10, le=3600, description="A device silent this long is reported missing (EN 50136: 20-90 s)."
    )
    retention_days: float = Field(
        90.0, ge=1, le=3650, description="Stored messages and device events older than this are deleted."
    )
    session_expiry_s: int = Field(
        1,
        ge=0,
        le=86400,
        description="How long the broker keeps a crashed receiver's session (and its share of the group) waiting.",
    )
    ca_dir: str = Field(
        "ca",
        description="The device CA ('edge-agent centre ca init'): key, certificate, register, CRL; relative to state_dir.",
    )
    max_inflight: int = Field(
        200, ge=1, le=65535, description="Messages taken from the broker but not yet stored (MQTT Receive Maximum)."
    )
    metrics_listen: str | None = Field(
        None,
        description='Prometheus metrics on "host:port" (e.g. "127.0.0.1:9464"; port 0: any free port); off when unset.',
    )

    @field_validator("database")
    @classmethod
    def _dsn_or_file(cls, value: str) -> str:
        if value.startswith(POSTGRES_SCHEMES):
            return value
        if "://" in value or "dbname=" in value or "host=" in value:
            raise ValueError(f"{value!r}: give PostgreSQL as a postgresql:// URI, or an SQLite file name")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is not None:
            split_listen_address(value)
        return value

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) to serve metrics on, or None when metrics are off."""
        return None if self.metrics_listen is None else split_listen_address(self.metrics_listen)


class ConsoleSection(Section):
    """The operators' web console (``edge-agent centre console``), reading the receiver's store."""

    listen: str = Field(
        "127.0.0.1:8080",
        description='"host:port" to serve on; localhost unless a reverse proxy with TLS sits in front (see README).',
    )
    secure_cookies: bool = Field(
        False, description="Mark session cookies Secure: set when the console is reached over HTTPS (a TLS proxy)."
    )
    session_idle_s: float = Field(
        8 * 3600, ge=60, le=7 * 86400, description="A session unused this long is logged out (one shift)."
    )
    login_attempts: int = Field(5, ge=1, le=100, description="Wrong passwords in a row before logins are refused.")
    lockout_s: float = Field(300.0, ge=1, le=86400, description="How long logins are refused after that.")
    clock_fault_s: float = Field(
        30.0, ge=1, le=86400, description="A device whose clock is off by more than this is marked on its alerts."
    )
    plans_dir: ConfigRelativePath | None = Field(
        None, description="Site-plan images for the map: <plan>.png, device x/y in its pixels (from provisioning)."
    )
    map_tiles_url: str | None = Field(
        None,
        description="The city's tile server, e.g. https://tiles.city.example/{z}/{x}/{y}.png; unset: a plain drawing.",
    )
    queue_closed_shown: int = Field(20, ge=0, le=1000, description="How many recently closed alerts the queue lists.")

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        split_listen_address(value)
        return value

    @field_validator("map_tiles_url")
    @classmethod
    def _tile_template(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith(("https://", "http://")) or not all(f"{{{k}}}" in value for k in "zxy"):
            raise ValueError(f"{value!r}: give an http(s) URL with {{z}}, {{x}} and {{y}} in it")
        return value

    @property
    def tiles_origin(self) -> str | None:
        """scheme://host[:port] of the tile server (the pages may load images from there, nowhere else)."""
        if self.map_tiles_url is None:
            return None
        scheme, _, rest = self.map_tiles_url.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}"

    @property
    def address(self) -> tuple[str, int]:
        return split_listen_address(self.listen)


class ReceiverConfig(Section):
    receiver: ReceiverSection = Field(default_factory=ReceiverSection)
    console: ConsoleSection = Field(default_factory=ConsoleSection)
    mqtt: MqttSection
    forward: ForwardSection = Field(default_factory=ForwardSection, description="Where verified events go on to.")

    @property
    def secret_dirs(self) -> tuple[Path, ...]:
        return (self.receiver.credentials_dir, self.receiver.state_dir)

    @property
    def keyring_path(self) -> Path:
        return self.receiver.state_dir / self.receiver.keyring_dir

    @property
    def ca_path(self) -> Path:
        return self.receiver.state_dir / self.receiver.ca_dir

    @property
    def database_dsn(self) -> str | None:
        """The PostgreSQL DSN when ``database`` names one, else None (an SQLite file)."""
        database = self.receiver.database
        return database if database.startswith(POSTGRES_SCHEMES) else None

    @property
    def database_path(self) -> Path:
        """The SQLite file (only meaningful when ``database`` is not a PostgreSQL DSN)."""
        return self.receiver.state_dir / self.receiver.database


def split_listen_address(value: str) -> tuple[str, int]:
    """ "host:port" or "[v6 address]:port" → (host, port); ValueError saying what is wrong otherwise."""
    host, colon, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f'{value!r} is not host:port (for example "127.0.0.1:9464")')
    return host, int(port)


def load_receiver_config(path: Path | str) -> ReceiverConfig:
    """Read and validate a receiver configuration; raises ConfigError listing every problem."""
    return load_model(path, ReceiverConfig)[0]
