"""Device and centre identities: Ed25519 keys, JWKs and compact JWS messages.

All JOSE encoding is joserfc's; this module only fixes the policy: one
algorithm (``Ed25519``, RFC 9864), a key id that is the RFC 7638 thumbprint,
private keys in 0600 files, and a verification that rejects any other
algorithm *before* looking at the signature.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey
from joserfc.jws import CompactSignature
from pydantic import BaseModel

from agent.errors import KeyFileError, SignatureInvalid
from agent.protocol.messages import Claims, decode_claims, parse_json_object
from agent.runtime.files import write_file_atomically

ALGORITHM = "Ed25519"
_REGISTRY = jws.JWSRegistry(algorithms=[ALGORITHM])


class _EvidenceRegistry(jws.JWSRegistry):
    """joserfc caps payloads at 128 kB, rightly, for messages; evidence images are bigger."""

    max_payload_length = 8 * 1024 * 1024


_LARGE_REGISTRY = _EvidenceRegistry(algorithms=[ALGORITHM])


def write_private_key(path: Path, key: OKPKey, *, force: bool, what: str) -> None:
    """Write a private key as PEM in a 0600 file (never wider, whatever the umask), atomically and synced."""
    if path.exists() and not force:
        raise KeyFileError(f"{path} already exists; refusing to replace {what} (use --force)")
    write_file_atomically(path, key.as_pem(private=True), 0o600)


def read_private_key(path: Path, curve: str, *, what: str, missing_hint: str) -> OKPKey:
    """Load a PEM private key of one curve, refusing files others can read."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist; {missing_hint}") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{what} {path} has mode {stat.S_IMODE(mode):04o}; run 'chmod 600 {path}'")
    try:
        key = OKPKey.import_key(data)
    except (JoseError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} does not hold an {curve} private key: {exc}") from None
    if key.curve_name != curve or not key.is_private:
        raise KeyFileError(f"{path} holds a {key.curve_name} key; an {curve} private key is required")
    return key


def generate_private_key(path: Path, *, force: bool = False) -> OKPKey:
    """Create a new Ed25519 key in a 0600 PEM file; refuses to replace one unless ``force``."""
    key = OKPKey.generate_key("Ed25519")
    write_private_key(path, key, force=force, what="a device identity")
    return key


def load_private_key(path: Path) -> OKPKey:
    """Load a PEM Ed25519 private key, refusing files others can read."""
    return read_private_key(path, "Ed25519", what="private key", missing_hint="create it with 'edge-agent keys init'")


def public_key_from_jwk(jwk: dict[str, Any], where: str) -> OKPKey:
    """Import a public Ed25519 JWK, naming ``where`` it came from on failure."""
    if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise KeyFileError(f"{where}: not an Ed25519 public JWK (need kty 'OKP', crv 'Ed25519')")
    if "d" in jwk:
        raise KeyFileError(f"{where}: holds a private key; only the public JWK may be shared")
    try:
        return OKPKey.import_key({k: jwk[k] for k in ("kty", "crv", "x")})
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise KeyFileError(f"{where}: invalid public JWK: {exc}") from None


def key_id(key: OKPKey) -> str:
    """The RFC 7638 thumbprint: the same public key always has the same id."""
    return key.thumbprint()


def public_jwk(key: OKPKey) -> dict[str, str]:
    """The shareable public half, with ``kid``, ``alg`` and ``use`` set."""
    jwk = {k: v for k, v in key.as_dict(private=False).items() if k in ("kty", "crv", "x")}
    return {**jwk, "kid": key_id(key), "alg": ALGORITHM, "use": "sig"}


class MessageSigner:
    """Signs claim sets as compact JWS with one private key."""

    def __init__(self, private_key: OKPKey):
        self._key = private_key
        self.kid = key_id(private_key)

    def sign(self, claims: dict[str, Any], large: bool = False) -> str:
        """Compact JWS of the claims; ``large`` lifts the 128 kB payload cap (evidence images only)."""
        return self.sign_payload(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode(), large)

    def sign_model(self, claims: BaseModel) -> str:
        """Compact JWS of a claims model, serialised by pydantic (a third of the cost of dumping and encoding)."""
        return self.sign_payload(claims.model_dump_json().encode())

    def sign_payload(self, payload: bytes, large: bool = False) -> str:
        header = {"alg": ALGORITHM, "kid": self.kid, "typ": "edge-agent+jws"}
        return jws.serialize_compact(header, payload, self._key, registry=_LARGE_REGISTRY if large else _REGISTRY)


@dataclass(frozen=True)
class OpenedToken:
    """A compact JWS taken apart once: its protected header (not yet trusted) and joserfc's object to verify."""

    header: dict[str, Any]
    compact: CompactSignature
    registry: jws.JWSRegistry


def open_token(token: str | bytes, large: bool = False) -> OpenedToken:
    """Take a compact JWS apart to find its key, without trusting anything in it.

    Any failure to parse, whatever joserfc raises for it, is ``malformed``: a
    hostile header must never escape as an exception nobody expected.
    """
    registry = _LARGE_REGISTRY if large else _REGISTRY
    try:
        raw = token if isinstance(token, bytes) else token.encode()
        compact = jws.extract_compact(raw, None, registry)
        header = dict(compact.headers())
    except Exception as exc:  # noqa: BLE001 - joserfc raises TypeError/KeyError/... on crafted headers
        raise SignatureInvalid("malformed", f"not a compact JWS: {type(exc).__name__}: {exc}") from None
    if "crit" in header:
        raise SignatureInvalid("malformed", f"critical header extension {header['crit']!r} is not understood")
    if not isinstance(header.get("kid", ""), str):
        raise SignatureInvalid("malformed", "key id is not a string")
    return OpenedToken(header, compact, registry)


def unverified_header(token: str | bytes, large: bool = False) -> dict[str, Any]:
    """The protected header, to find the key: nothing in it is trusted yet."""
    return open_token(token, large).header


def verify_opened(opened: OpenedToken, key: OKPKey) -> bytes:
    """Check the algorithm and the signature of an opened token; return the signed payload bytes, unparsed."""
    header = opened.header
    if header.get("alg") != ALGORITHM:
        raise SignatureInvalid(
            "algorithm_not_allowed", f"algorithm {header.get('alg')!r} is not accepted; only {ALGORITHM}"
        )
    try:
        valid = jws.validate_compact(opened.compact, key, registry=opened.registry)
    except JoseError as exc:
        raise SignatureInvalid(
            "bad_signature", f"signature does not verify with key {header.get('kid')!r}: {exc}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - anything else joserfc trips over is a malformed token
        raise SignatureInvalid("malformed", f"not a verifiable JWS: {type(exc).__name__}: {exc}") from None
    if not valid:
        raise SignatureInvalid("bad_signature", f"signature does not verify with key {header.get('kid')!r}")
    return opened.compact.payload


def verify_payload(token: str | bytes, key: OKPKey, large: bool = False) -> bytes:
    """Check the algorithm and the signature; return the signed payload bytes, unparsed."""
    return verify_opened(open_token(token, large), key)


def verify(token: str | bytes, key: OKPKey, large: bool = False) -> dict[str, Any]:
    """Check the algorithm and the signature; return the claims as a dict (shape checked, types not)."""
    return parse_json_object(verify_payload(token, key, large))


def verify_claims(model: type[Claims], token: str | bytes | OpenedToken, key: OKPKey, large: bool = False) -> Claims:
    """Verify a token (or one already opened) and validate its claims strictly; every failure is a :class:`SignatureInvalid`."""
    opened = token if isinstance(token, OpenedToken) else open_token(token, large)
    return decode_claims(model, verify_opened(opened, key))
