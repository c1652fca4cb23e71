"""The claims gate parses once: what it and pydantic take together is exactly what strict JSON takes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from agent.errors import SignatureInvalid
from agent.protocol.messages import check_json_text

AS_OBJECT = TypeAdapter(dict[str, Any])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


def strict_json_object(payload: bytes) -> bool:
    """Python's parser with NaN and Infinity refused, and an object at the top."""

    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        return isinstance(json.loads(payload, parse_constant=refuse), dict)
    except (ValueError, RecursionError):
        return False


def gate_then_pydantic(payload: bytes) -> bool:
    try:
        check_json_text(payload)
        AS_OBJECT.validate_json(payload, strict=True)
    except (SignatureInvalid, ValidationError):
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(value=st.dictionaries(st.text(max_size=8), json_values, max_size=5), ascii_only=st.booleans())
def test_written_json_is_taken_exactly_when_it_is_strict_json(value, ascii_only):
    """Python writes NaN and Infinity for non-finite floats: those payloads, and only those, are refused."""
    payload = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert gate_then_pydantic(payload) == strict_json_object(payload)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_nothing_but_strict_json_passes_the_gate_and_pydantic(payload):
    if gate_then_pydantic(payload):
        assert strict_json_object(payload)


@pytest.mark.parametrize("word", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_malformed_and_their_name_inside_a_string_is_not(word):
    with pytest.raises(SignatureInvalid) as refused:
        check_json_text(b'{"created": ' + word + b"}")
    assert refused.value.reason == "malformed"
    check_json_text(b'{"note": "' + word + b' \\" NaN"}')  # words inside strings are text
