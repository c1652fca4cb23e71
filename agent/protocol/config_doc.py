"""Configuration documents the centre pushes to devices: a signed, versioned, expiring overlay.

A document is a TOML text in the device configuration's own shape: the whole
device file or a part of it (zones, rules, thresholds, intervals). On the
device it is laid over what it runs: tables merge key by key, everything else
(arrays of tables such as ``[[zones]]`` and ``[[rules]]`` included) replaces
the value it names.

What a push may never carry, checked at the centre before signing and again on
the device: secrets (any key ending in ``_file`` or named like a secret:
``password``, ``key``, ``token``…), and the settings that tie a device to its
own disk and identity: ``device.id``/``site``/``kind``/``state_dir``/
``credentials_dir``, the whole ``[identity]`` and ``[mqtt.tls]`` tables,
``outbox.path`` and ``control.socket``. Those stay the installer's.

The signed claims (:class:`ConfigClaims`) name one device and its site (the
centre signs one copy per device it targets), the selector the operator used,
a version that only ever grows, and an expiry.
"""

from __future__ import annotations

import json
import time
import tomllib
from typing import Any, Literal

from joserfc.jwk import OKPKey
from pydantic import Field

from agent.config.errors import SECRET_KEYS
from agent.errors import ConfigError, SignatureInvalid
from agent.protocol.messages import SCHEMA_VERSION, Name, Strict, UnixTime, decode_claims
from agent.protocol.signing import MessageSigner, open_token, verify_opened

#: Largest document accepted (the TOML's parsed form, as canonical JSON): a device config is a few kB.
MAX_DOCUMENT_BYTES = 48 * 1024
#: Settings a push may not change: they bind the device to its disk, its identity and its transport security.
LOCAL_ONLY: frozenset[tuple[str, ...]] = frozenset(
    {
        ("device", "id"),
        ("device", "site"),
        ("device", "kind"),
        ("device", "state_dir"),
        ("device", "credentials_dir"),
        ("identity",),
        ("mqtt", "tls"),
        ("outbox", "path"),
        ("control", "socket"),
    }
)
#: What ``--group`` selects: devices of one kind.
GROUPS = ("call-point", "building-button", "camera-box")


class ConfigClaims(Strict):
    """The signed claims of one pushed configuration, addressed to one device."""

    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["config"] = "config"
    device: str = Name
    site: str = Name
    selector: str = Field(min_length=1, max_length=80, pattern=r"^(device|site|group):[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: int = Field(ge=1, le=2**53 - 1, description="Grows with every push; a device never goes back.")
    issued: float = UnixTime
    expires: float = UnixTime
    gate_s: float = Field(60.0, ge=5, le=3600, description="The test alert must be acknowledged within this.")
    config: dict[str, Any]


def parse_document(text: str, where: str = "configuration document") -> dict[str, Any]:
    """A pushed configuration's TOML as a dict, refused (ConfigError, every problem) if it carries what it may not."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    check_document(data, where)
    return data


def check_document(data: Any, where: str = "configuration document") -> None:
    """Raise ConfigError listing every secret or local-only setting in ``data`` (and refuse oversize documents)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a configuration document is a table")
    if not data:
        raise ConfigError(f"{where}: the document is empty; nothing to push")
    size = len(json.dumps(data, default=str))
    if size > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"{where}: {size} bytes; at most {MAX_DOCUMENT_BYTES} bytes are pushed")
    problems = [f"{where}: {line}" for line in refused_settings(data)]
    if problems:
        raise ConfigError(f"{where}: {len(problems)} setting(s) may not be pushed:\n" + "\n".join(problems), problems)


def refused_settings(data: dict[str, Any], path: tuple[str, ...] = (), shown: str = "") -> list[str]:
    """One line per setting a push may not carry, by its dotted path (``zones[1].name``).

    ``path`` leaves out list indices, so a table inside an array is judged by where it stands.
    """
    found: list[str] = []
    for key, value in data.items():
        here = (*path, str(key))
        dotted = f"{shown}.{key}" if shown else str(key)
        if _is_secret(str(key)):
            found.append(f"{dotted}: secrets and secret files are never pushed; they stay on the device")
        elif any(here[: len(local)] == local for local in LOCAL_ONLY):
            found.append(f"{dotted}: set on the device by its installer; a push may not change it")
        elif isinstance(value, dict):
            found += refused_settings(value, here, dotted)
        elif isinstance(value, list):
            for n, item in enumerate(value):
                if isinstance(item, dict):
                    found += refused_settings(item, here, f"{dotted}[{n}]")
    return found


def _is_secret(key: str) -> bool:
    lowered = key.lower()
    return (
        lowered.endswith("_file") or lowered in SECRET_KEYS or any(lowered.endswith(f"_{word}") for word in SECRET_KEYS)
    )


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` laid over ``base``: tables merge key by key, any other value replaces; neither is changed."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def sign_document(
    signer: MessageSigner,
    config: dict[str, Any],
    *,
    device: str,
    site: str,
    selector: str,
    version: int,
    expires_in_s: float,
    gate_s: float = 60.0,
    now: float | None = None,
) -> str:
    """The compact JWS of one device's copy; the claims are validated before they are signed."""
    now = time.time() if now is None else now
    claims = ConfigClaims(
        device=device,
        site=site,
        selector=selector,
        version=version,
        issued=now,
        expires=now + expires_in_s,
        gate_s=gate_s,
        config=config,
    )
    return signer.sign_model(claims)


def open_document(token: bytes, centre_key: OKPKey) -> ConfigClaims:
    """Verify a pushed document with the centre's key; every failure is a SignatureInvalid with its reason."""
    if len(token) > MAX_DOCUMENT_BYTES * 2:
        raise SignatureInvalid("oversized", f"{len(token)} bytes, more than {MAX_DOCUMENT_BYTES * 2}")
    claims = decode_claims(ConfigClaims, verify_opened(open_token(token), centre_key))
    try:
        check_document(claims.config, f"pushed configuration v{claims.version}")
    except ConfigError as exc:
        raise SignatureInvalid("refused_setting", "; ".join(exc.problems)) from None
    return claims
