"""Reading a configuration file: TOML in, a validated model out, or every problem with its file:line.

Unknown keys, wrong types and impossible values are refused with the key
path, the offending value and a hint, so an installer on a ladder learns what
to fix from one run of ``edge-agent config check``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config.base import Section
from agent.config.errors import describe_validation_error
from agent.errors import ConfigError


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_model(path: Path | str, model: type[Section]) -> tuple[Any, str]:
    """The validated model and the file's text (for its hash); ConfigError listing every problem."""
    path = Path(path)
    text, data = _read_toml(path)
    try:
        config = model.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        problems = describe_validation_error(exc, text, str(path), model)
        raise ConfigError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(problems), problems) from None
    return config, text
