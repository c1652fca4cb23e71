"""The pushed-configuration document: hostile text and tokens are refused with a reason, secrets never pass."""

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config.errors import SECRET_KEYS
from agent.errors import ConfigError, SignatureInvalid
from agent.protocol.config_doc import LOCAL_ONLY, merge, open_document, parse_document, sign_document
from agent.protocol.signing import MessageSigner, generate_private_key

KEYS = st.sampled_from(
    ["telemetry", "interval_s", "zones", "rules", "name", "device", "id", "site", "identity", "mqtt", "tls",
     "password", "password_file", "ca_file", "camera", "token", "key", "api_key", "outbox", "path", "control",
     "socket", "keepalive_s", "x"]
)  # fmt: skip
SCALARS = st.one_of(st.integers(-(2**40), 2**40), st.booleans(), st.text(max_size=8), st.floats(allow_nan=False))
DOCUMENTS = st.recursive(
    st.dictionaries(KEYS, SCALARS, max_size=4),
    lambda inner: st.dictionaries(KEYS, st.one_of(SCALARS, inner, st.lists(inner, max_size=3)), max_size=4),
    max_leaves=25,
)


def forbidden(data, path=()) -> bool:
    """Independently of the code under test: a secret-looking key, or a local-only path, anywhere."""
    for key, value in data.items():
        here = (*path, key)
        lowered = key.lower()
        if lowered.endswith("_file") or lowered in SECRET_KEYS or lowered.split("_")[-1] in SECRET_KEYS:
            return True
        if any(here[: len(p)] == p for p in LOCAL_ONLY):
            return True
        if isinstance(value, dict) and forbidden(value, here):
            return True
        if isinstance(value, list) and any(isinstance(v, dict) and forbidden(v, path + (key,)) for v in value):
            return True
    return False


@pytest.fixture(scope="module")
def centre(tmp_path_factory):
    """The centre's key pair: (signer, key)."""
    key = generate_private_key(tmp_path_factory.mktemp("centre") / "centre.pem")
    return MessageSigner(key), key


@given(st.text(max_size=300))
def test_any_text_is_a_document_or_a_config_error(text):
    try:
        data = parse_document(text)
    except ConfigError as exc:
        assert exc.problems
        return
    assert isinstance(data, dict) and data and not forbidden(data)


@given(DOCUMENTS)
def test_a_document_passes_only_without_secrets_or_local_settings(data):
    from agent.protocol.config_doc import check_document

    try:
        check_document(data)
    except ConfigError as exc:
        assert forbidden(data) or not data
        assert all(line.startswith("configuration document: ") for line in exc.problems)
        return
    assert not forbidden(data)


@given(DOCUMENTS, DOCUMENTS)
def test_merge_lays_the_overlay_over_and_changes_neither(base, overlay):
    before = (copy.deepcopy(base), copy.deepcopy(overlay))
    merged = merge(base, overlay)
    assert (base, overlay) == before
    assert set(merged) == set(base) | set(overlay)
    for key, value in overlay.items():
        if not (isinstance(value, dict) and isinstance(base.get(key), dict)):
            assert merged[key] == value
    assert merge(base, {}) == base and merge({}, overlay) == overlay


@settings(max_examples=50)
@given(position=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_a_signed_document_opens_and_any_altered_byte_is_refused(centre, position, byte):
    doc = {"telemetry": {"interval_s": 10}, "zones": [{"name": "door", "polygon": [[0, 0], [1, 0], [1, 1]]}]}
    signer, key = centre
    token = sign_document(signer, doc, device="cp-1", site="s", selector="site:s", version=3, expires_in_s=60)
    claims = open_document(token.encode(), centre[1])
    assert claims.config == doc and claims.version == 3
    raw = bytearray(token.encode())
    position %= len(raw)
    if raw[position] == byte:
        return
    raw[position] = byte
    try:
        altered = open_document(bytes(raw), centre[1])
    except SignatureInvalid as exc:
        assert exc.reason in {"malformed", "bad_signature", "algorithm_not_allowed"}
        return
    assert altered == claims  # base64url has bits that decode the same: only an identical document may pass


@given(payload=st.binary(max_size=400))
def test_arbitrary_bytes_are_refused_with_a_reason(centre, payload):
    with pytest.raises(SignatureInvalid):
        open_document(payload, centre[1])


def test_the_sample_push_document_is_a_valid_overlay_for_the_sample_camera_box():
    import tomllib
    from pathlib import Path

    from agent.config.device import AgentConfig

    examples = Path(__file__).resolve().parents[2] / "examples"
    document = parse_document((examples / "push-camera-rules.toml").read_text())
    base = tomllib.loads((examples / "camera-box.toml").read_text())
    config = AgentConfig.model_validate(merge(base, document), context={"base_dir": examples})
    assert [r.name for r in config.rules] == ["after-hours", "loitering-entrance"]
