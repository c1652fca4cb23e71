"""Evidence sealed for the centre: X25519 keys, the centre's public key set, and compact JWE.

All JOSE encoding is joserfc's; this module fixes the policy. An evidence image
is encrypted to the centre's X25519 key with ``ECDH-ES`` (direct key agreement,
RFC 7518 §4.6) and ``A256GCM``: one recipient in a compact JWE needs no key
wrapping (``+A256KW`` only earns its keep with several recipients), and a fresh
ephemeral key per image gives a fresh content key, so a GCM nonce is never reused
under one key. The centre publishes its public keys as a JWK Set
``{"keys": [sig, enc]}``; a device may still hold the older single signing JWK,
which is enough for everything but evidence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

from agent.errors import AgentError, ConfigError, KeyFileError
from agent.protocol.signing import key_id, public_jwk, public_key_from_jwk, read_private_key, write_private_key

KEY_ALGORITHM = "ECDH-ES"
CONTENT_ENCRYPTION = "A256GCM"
#: Largest image sealed; its JWE still fits the device-signed reply (signing's 8 MiB cap on large JWS).
MAX_SEALED_BYTES = 4 * 1024 * 1024


class SealedDataInvalid(AgentError, ValueError):
    """A JWE could not be opened: malformed, for another key, or altered on the way."""


class _EvidenceJWERegistry(jwe.JWERegistry):
    """joserfc caps JWE ciphertext at 64 kB, rightly, for messages; evidence images are bigger."""

    max_ciphertext_length = (MAX_SEALED_BYTES * 4) // 3 + 4  # base64url of the largest image


_REGISTRY = _EvidenceJWERegistry(algorithms=[KEY_ALGORITHM, CONTENT_ENCRYPTION])


@dataclass(frozen=True)
class CentreKeys:
    """The centre's public keys as a device holds them; ``encryption`` is None for a signing-only file."""

    signing: OKPKey
    encryption: OKPKey | None
    source: str

    def require_encryption(self, why: str) -> OKPKey:
        """The encryption key, or a ConfigError saying which file to replace and with what."""
        if self.encryption is None:
            raise ConfigError(
                f"{self.source} holds only the centre's signing key, but {why}: evidence is encrypted for the "
                "centre, so install the key set {\"keys\": [sig, enc]} printed by 'edge-agent receiver init' there"
            )
        return self.encryption


def generate_encryption_key(path: Path, *, force: bool = False) -> OKPKey:
    """Create the centre's X25519 key in a 0600 PEM file; refuses to replace one unless ``force``."""
    key = OKPKey.generate_key("X25519")
    write_private_key(path, key, force=force, what="the centre's encryption key")
    return key


def load_encryption_key(path: Path) -> OKPKey:
    """Load the centre's X25519 private key, refusing files others can read."""
    hint = "create it with 'edge-agent receiver init' and give devices the key set it prints"
    return read_private_key(path, "X25519", what="encryption key", missing_hint=hint)


def encryption_jwk(key: OKPKey) -> dict[str, str]:
    """The shareable public half of the centre's X25519 key, with ``kid``, ``alg`` and ``use``."""
    jwk = {k: v for k, v in key.as_dict(private=False).items() if k in ("kty", "crv", "x")}
    return {**jwk, "kid": key_id(key), "alg": KEY_ALGORITHM, "use": "enc"}


def centre_key_set(signing_key: OKPKey, encryption_key: OKPKey) -> dict[str, list[dict[str, str]]]:
    """What ``receiver init`` prints and devices install as ``centre.jwk``."""
    return {"keys": [public_jwk(signing_key), encryption_jwk(encryption_key)]}


def load_centre_keys(path: Path) -> CentreKeys:
    """Read a device's ``centre_key_file``: the single Ed25519 JWK or the JWK Set from ``receiver init``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyFileError(f"centre key {path} does not exist; copy what 'edge-agent receiver init' printed") from None
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the centre's public key {path}: {exc}") from None
    return parse_centre_keys(data, str(path))


def parse_centre_keys(data: Any, where: str) -> CentreKeys:
    """Check a centre key document: exactly one Ed25519 signing key, at most one X25519 encryption key."""
    if isinstance(data, dict) and "keys" not in data:
        return CentreKeys(public_key_from_jwk(data, where), None, where)
    members = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise KeyFileError(f'{where}: expected a public JWK or a JWK Set {{"keys": [...]}}')
    signing = [m for m in members if m.get("crv") == "Ed25519"]
    encryption = [m for m in members if m.get("crv") == "X25519"]
    if len(signing) != 1 or len(encryption) > 1 or len(members) != len(signing) + len(encryption):
        raise KeyFileError(
            f"{where}: a centre key set holds one Ed25519 key (use 'sig') and at most one X25519 key (use 'enc'); "
            f"found {', '.join(str(m.get('crv')) for m in members) or 'none'}"
        )
    signing_key = _checked(signing[0], "sig", public_key_from_jwk(signing[0], f"{where}: signing key"), where)
    encryption_key = _encryption_key(encryption[0], where) if encryption else None
    return CentreKeys(signing_key, encryption_key, where)


def _encryption_key(jwk: dict[str, Any], where: str) -> OKPKey:
    if jwk.get("kty") != "OKP" or "d" in jwk:
        raise KeyFileError(f"{where}: the encryption key must be a public OKP JWK (no 'd')")
    try:
        key = OKPKey.import_key({k: jwk[k] for k in ("kty", "crv", "x")})
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise KeyFileError(f"{where}: invalid X25519 public JWK: {exc}") from None
    return _checked(jwk, "enc", key, where)


def _checked(jwk: dict[str, Any], use: str, key: OKPKey, where: str) -> OKPKey:
    if jwk.get("use", use) != use:
        raise KeyFileError(f"{where}: the {jwk.get('crv')} key has use {jwk.get('use')!r}; expected {use!r}")
    if jwk.get("kid") is not None and jwk["kid"] != key_id(key):
        raise KeyFileError(f"{where}: kid {jwk['kid']!r} is not the key's thumbprint {key_id(key)!r}")
    return key


def seal(plaintext: bytes, public_key: OKPKey, content_type: str = "image/jpeg") -> str:
    """Compact JWE of ``plaintext`` that only the holder of ``public_key``'s private half can open."""
    if len(plaintext) > MAX_SEALED_BYTES:
        raise SealedDataInvalid(f"{len(plaintext)} bytes is more than the {MAX_SEALED_BYTES} bytes sealed")
    header = {"alg": KEY_ALGORITHM, "enc": CONTENT_ENCRYPTION, "kid": key_id(public_key), "cty": content_type}
    return jwe.encrypt_compact(header, plaintext, public_key, registry=_REGISTRY)


def unseal(token: str, private_key: OKPKey) -> bytes:
    """Open a compact JWE sealed by :func:`seal`; any other algorithm, key or alteration is refused."""
    try:
        sealed = jwe.decrypt_compact(token, private_key, registry=_REGISTRY)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        kid = _unverified_kid(token)
        ours = key_id(private_key)
        if kid is not None and kid != ours:
            raise SealedDataInvalid(f"sealed for key {kid!r}, not this centre's key {ours!r}") from None
        raise SealedDataInvalid(f"cannot be opened with key {ours!r}: {exc or type(exc).__name__}") from None
    return sealed.plaintext or b""


def _unverified_kid(token: str) -> str | None:
    """The ``kid`` a JWE claims, for a helpful message only (never trusted)."""
    try:
        kid = jwe.extract_compact(token.encode(), _REGISTRY).headers().get("kid")
    except Exception:  # noqa: BLE001 - hostile input: any failure means "no usable kid"
        return None
    return kid if isinstance(kid, str) else None
