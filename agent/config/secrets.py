"""Where secrets live: never in the config file, which names files (every setting ending in ``_file``),
found in ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``), then ``credentials_dir``, then the
state directory."""

from __future__ import annotations

import os
from pathlib import Path

from agent.config.base import Section
from agent.errors import ConfigError


def resolve_secret(name: str, *dirs: Path) -> Path:
    """Find a secret file: absolute as given, else in ``$CREDENTIALS_DIRECTORY`` (systemd
    ``LoadCredential=``), else in the first of ``dirs`` holding it, else where it belongs (``dirs[0]``)."""
    path = Path(name)
    if path.is_absolute():
        return path
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and _exists(Path(credentials) / path):
        return Path(credentials) / path
    for directory in dirs:
        if _exists(directory / path):
            return directory / path
    return dirs[0] / path


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a directory the service user may not enter (the root-only one) counts as no."""
    try:
        return path.exists()
    except OSError:
        return False


def secret_file(name: str, dirs: tuple[Path, ...], setting: str) -> Path:
    """The path of a credential file (see ``resolve_secret``) once it is known to be readable.

    Raises ConfigError, one line naming the setting and the file, when it is missing or
    unreadable (the service user cannot read the root-only credentials directory: systemd
    must hand the file over with ``LoadCredential=``).
    """
    path = resolve_secret(name, *dirs)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(_unreadable(name, path, setting, exc)) from None
    return path


def read_secret(name: str, dirs: tuple[Path, ...], what: str) -> str:
    """Read a one-line secret (a password), naming the file and setting when it is missing."""
    path = resolve_secret(name, *dirs)
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(_unreadable(name, path, what, exc)) from None


def _unreadable(name: str, path: Path, setting: str, exc: Exception) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = f"{setting}: cannot read {path}: {reason}"
    if isinstance(exc, PermissionError) and not Path(name).is_absolute():
        text += " (a service reads credentials from $CREDENTIALS_DIRECTORY: run 'edge-agent config credentials')"
    return text


def credential_files(config: Section) -> list[tuple[str, str]]:
    """Every credential a configuration names by a plain relative file name, as (setting, name).

    These are the settings ending in ``_file`` (keys, the centre's key, passwords, TLS files);
    they are what a systemd unit must pass in with ``LoadCredential=NAME:credentials_dir/NAME``.
    """
    found: list[tuple[str, str]] = []

    def walk(section: Section, prefix: str) -> None:
        for field_name in type(section).model_fields:
            value = getattr(section, field_name)
            if isinstance(value, Section):
                walk(value, f"{prefix}{field_name}.")
            elif isinstance(value, list):  # e.g. [[forward.arc]]: each entry by its name
                for n, item in enumerate(value):
                    if isinstance(item, Section):
                        walk(item, f"{prefix}{field_name}.{getattr(item, 'name', n)}.")
            elif field_name.endswith("_file") and isinstance(value, str) and "/" not in value:
                found.append((prefix + field_name, value))

    walk(config, "")
    return found
