"""A whole site on one machine: centre keys, a receiver config and enrolled devices in a directory.

The demo, the tests and the benchmarks all build their world with this, from
real config files, real keys and a real broker, exactly as an installer would
with ``keys init`` and ``receiver enroll``.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.centre.keyring import Keyring
from agent.config.centre import load_receiver_config
from agent.config.device import AgentConfig, load_agent_config
from agent.demo.broker import LocalBroker
from agent.protocol.enrolment import enrolment_record
from agent.protocol.sealing import centre_key_set, generate_encryption_key
from agent.protocol.signing import generate_private_key, public_jwk

DEFAULT_BUTTON = '[[buttons]]\nname = "main"\npin = 17\nalert_kind = "assistance"\nlocation = "Main entrance"\n'


class LocalSite:
    """Centre and devices under ``root``, talking to ``broker``."""

    def __init__(self, root: Path, broker: LocalBroker, site: str = "demo-site", prefix: str = "edge"):
        self.root = Path(root)
        self.broker = broker
        self.site = site
        self.prefix = prefix
        self.centre_dir = self.root / "centre"
        self.centre_dir.mkdir(parents=True, exist_ok=True)
        self._receiver_config_path = self.centre_dir / "receiver.toml"
        self._receiver_config_path.write_text(
            f'[receiver]\nid = "centre-1"\nstate_dir = "."\ncredentials_dir = "credentials"\n\n{self.mqtt_toml()}'
        )
        self.receiver_config = load_receiver_config(self._receiver_config_path)
        credentials = self.receiver_config.secret_dirs[0]
        centre_key = generate_private_key(credentials / self.receiver_config.receiver.signing_key_file, force=True)
        encryption_key = generate_encryption_key(
            credentials / self.receiver_config.receiver.encryption_key_file, force=True
        )
        #: The centre's signing JWK alone (what a device without evidence may hold).
        self.centre_jwk = public_jwk(centre_key)
        #: What ``receiver init`` prints and every device here gets: {"keys": [sig, enc]}.
        self.centre_keys = centre_key_set(centre_key, encryption_key)
        self.keyring = Keyring(self.receiver_config.keyring_path)

    def mqtt_toml(self, client_id: str | None = None, extra: str = "") -> str:
        lines = [
            "[mqtt]",
            f'host = "{self.broker.host}"',
            f"port = {self.broker.port}",
            f'topic_prefix = "{self.prefix}"',
            "reconnect_min_s = 0.1",
            "reconnect_max_s = 1.0",
        ]
        if client_id:
            lines.append(f'client_id = "{client_id}"')
        return "\n".join(lines) + "\n" + extra + "\n[mqtt.tls]\nenabled = false\n"

    def receiver_toml_path(self) -> Path:
        return self._receiver_config_path

    def add_device(
        self,
        device_id: str,
        kind: str = "call-point",
        body: str = DEFAULT_BUTTON,
        enroll: bool = True,
        outbox: str = "",
    ) -> AgentConfig:
        """Write a device config, create its key and the centre's public key set, and enrol it."""
        device_dir = self.root / device_id
        device_dir.mkdir(parents=True, exist_ok=True)
        path = device_dir / "agent.toml"
        path.write_text(
            f'[device]\nid = "{device_id}"\nsite = "{self.site}"\nkind = "{kind}"\nstate_dir = "state"\n'
            f'credentials_dir = "credentials"\n\n'
            f"{self.mqtt_toml()}\n[outbox]\nack_retry_s = 5\n{outbox}\n{body}"
        )
        config = load_agent_config(path)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        credentials = config.secret_dirs[0]
        key = generate_private_key(credentials / config.identity.private_key_file, force=True)
        (credentials / config.identity.centre_key_file).write_text(json.dumps(self.centre_keys))
        if enroll:
            self.keyring.enroll(enrolment_record(device_id, self.site, kind, key))
        return config

    def device_config_path(self, device_id: str) -> Path:
        return self.root / device_id / "agent.toml"
