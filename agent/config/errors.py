"""Turn pydantic validation errors into lines an installer can act on.

Each line names the file and line, the key path, the value found and what to
do: ``site.toml:12: mqtt.port = 70000: must be at most 65535``.
"""

from __future__ import annotations

import difflib
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

SECRET_KEYS = {"password", "private_key", "secret", "key", "token", "passphrase"}
_TYPE_TAGS = re.compile(r"^(int|str|float|bool|none|literal\[.*\]|.*\[.*\])$")


def describe_validation_error(
    exc: ValidationError, text: str, filename: str, model: type[BaseModel] | None = None
) -> list[str]:
    """One line per problem, merging the branches of a union into one line."""
    lines = _line_index(text)
    merged: dict[tuple, list[dict[str, Any]]] = {}
    for error in exc.errors(include_url=False):
        loc = tuple(part for part in error["loc"] if not (isinstance(part, str) and _TYPE_TAGS.match(part)))
        merged.setdefault(loc, []).append(error)
    problems = []
    for loc, errors in merged.items():
        path = _dotted(loc)
        line = _find_line(lines, loc)
        where = f"{filename}:{line}" if line else filename
        message = _message(errors, loc, model)
        if errors[0]["type"] == "missing" or not loc or str(loc[-1]).lower() in SECRET_KEYS:
            problems.append(f"{where}: {path or '(top level)'}: {message}")
        else:
            problems.append(f"{where}: {path} = {_show(errors[0]['input'])}: {message}")
    return problems


def _message(errors: list[dict[str, Any]], loc: tuple, model: type[BaseModel] | None) -> str:
    kind = errors[0]["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        if key.lower() in SECRET_KEYS:
            return f"secrets are not written in the config file: put it in a file and name that file with {key}_file"
        known = _known_keys(model, loc[:-1])
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known) or 'none'}"
        return f"unknown key; {hint}"
    if kind == "missing":
        return "required key is missing"
    if len(errors) > 1 and all(e["type"].endswith("_type") or e["type"].endswith("_parsing") for e in errors):
        expected = ", ".join(e["type"].split("_")[0] for e in errors)
        return f"wrong type; expected one of: {expected}"
    text = errors[0]["msg"]
    return text.removeprefix("Value error, ")


def _known_keys(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    if model is None:
        return []
    return [name for name, field in model.model_fields.items() if not field.exclude]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _line_index(text: str) -> dict[tuple, int]:
    """Map table paths and key paths to the 1-based line that defines them."""
    index: dict[tuple, int] = {}
    table: tuple = ()
    array_counts: dict[tuple, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[["):
            name = tuple(p.strip() for p in line.strip("[]").split("."))
            array_counts[name] = array_counts.get(name, -1) + 1
            table = name + (array_counts[name],)
            index.setdefault(table, number)
        elif line.startswith("["):
            table = tuple(p.strip() for p in line.strip("[]").split("."))
            index.setdefault(table, number)
        elif "=" in line:
            key = tuple(p.strip().strip('"') for p in line.split("=", 1)[0].split("."))
            index.setdefault(table + key, number)
    return index


def _find_line(index: dict[tuple, int], loc: tuple) -> int | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in index:
            return index[loc[:end]]
    return None
