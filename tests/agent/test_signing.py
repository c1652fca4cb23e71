"""Device identity: keys are private to the device, messages are JWS with Ed25519 only."""

import json
import stat

import pytest
from joserfc import jws
from joserfc.jwk import OctKey, OKPKey

from agent.cli import main
from agent.errors import KeyFileError, SignatureInvalid
from agent.protocol.signing import (
    MessageSigner,
    generate_private_key,
    key_id,
    load_private_key,
    public_jwk,
    unverified_header,
    verify,
)


def test_generated_key_file_is_private_and_not_replaced(tmp_path):
    path = tmp_path / "device-key.pem"
    key = generate_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_private_key(path)) == key_id(key)
    with pytest.raises(KeyFileError, match="already exists; refusing to replace a device identity"):
        generate_private_key(path)


def test_key_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "device-key.pem"
    generate_private_key(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=r"has mode 0644; run 'chmod 600 .*device-key.pem'"):
        load_private_key(path)


def test_missing_key_names_the_command_that_creates_it(tmp_path):
    with pytest.raises(KeyFileError, match="create it with 'edge-agent keys init'"):
        load_private_key(tmp_path / "nope.pem")


def test_public_jwk_has_thumbprint_kid_and_no_private_part(tmp_path):
    jwk = public_jwk(generate_private_key(tmp_path / "k.pem"))
    assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert jwk["alg"] == "Ed25519" and jwk["crv"] == "Ed25519"
    assert jwk["kid"] == OKPKey.import_key({k: jwk[k] for k in ("kty", "crv", "x")}).thumbprint()


def test_signed_message_verifies_and_carries_kid(tmp_path):
    key = generate_private_key(tmp_path / "k.pem")
    token = MessageSigner(key).sign({"seq": 1, "body": {"a": 1}})
    header = unverified_header(token)
    assert header["alg"] == "Ed25519" and header["kid"] == key_id(key)
    assert verify(token, key) == {"seq": 1, "body": {"a": 1}}


def test_other_algorithms_are_refused_before_the_signature(tmp_path):
    key = generate_private_key(tmp_path / "k.pem")
    secret = OctKey.generate_key(256)
    hmac_token = jws.serialize_compact({"alg": "HS256", "kid": key_id(key)}, b"{}", secret)
    with pytest.raises(SignatureInvalid, match="algorithm 'HS256' is not accepted; only Ed25519") as caught:
        verify(hmac_token, key)
    assert caught.value.reason == "algorithm_not_allowed"


def test_keys_init_prints_an_enrolment_record(tmp_path, capsys):
    config = tmp_path / "agent.toml"
    config.write_text(
        '[device]\nid = "cp-9"\nsite = "s"\nkind = "call-point"\nstate_dir = "state"\ncredentials_dir = "creds"\n'
        '[mqtt]\nhost = "b"\n[[buttons]]\nname = "m"\npin = 4\n'
    )
    assert main(["keys", "init", "--config", str(config)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["device_id"] == "cp-9" and record["jwk"]["kid"] == record["kid"]
    assert "d" not in record["jwk"]
    assert stat.S_IMODE((tmp_path / "creds" / "device-key.pem").stat().st_mode) == 0o600
    assert main(["keys", "init", "--config", str(config)]) == 1
    assert "refusing to replace a device identity (use --force)" in capsys.readouterr().err
