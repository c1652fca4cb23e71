"""Commands the centre sends a device: signed, single use, expiring.

``<prefix>/<site>/<device>/command`` carries a compact JWS over
:class:`CommandClaims`, signed with the centre's key, never retained. The
device refuses a command that does not verify with the centre's key, names
another device, has expired or whose ``command_id`` it has run before, and
answers every command it takes (and the refusals it can attribute) with a
signed ``event`` whose body is ``{"command": {...}}``: the receiver stores it
like any event, so the centre's store is the audit of what was asked and done.
"""

from __future__ import annotations

import uuid
from typing import Literal

from joserfc.jwk import OKPKey
from pydantic import Field

from agent.errors import SignatureInvalid
from agent.protocol.messages import SCHEMA_VERSION, Name, Strict, UnixTime, decode_claims
from agent.protocol.signing import MessageSigner, open_token, verify_opened

COMMANDS = ("selftest", "test-alert", "restart", "snapshot")
#: A command is valid this long at most: it is meant to run now, not when a device comes back next week.
MAX_LIFETIME_S = 3600.0
MAX_COMMAND_BYTES = 4096


class CommandClaims(Strict):
    v: Literal[1] = SCHEMA_VERSION
    kind: Literal["command"] = "command"
    device: str = Name
    site: str = Name
    command: Literal["selftest", "test-alert", "restart", "snapshot"]
    command_id: uuid.UUID = Field(description="Single use: the device runs each id once.")
    sent: float = UnixTime
    expires: float = UnixTime


def sign_command(
    signer: MessageSigner, *, device: str, site: str, command: str, sent: float, lifetime_s: float
) -> tuple[str, str]:
    """(token, command id) of a new command; lifetime capped at MAX_LIFETIME_S."""
    command_id = uuid.uuid4()
    claims = CommandClaims(
        device=device,
        site=site,
        command=command,
        command_id=command_id,
        sent=sent,
        expires=sent + min(lifetime_s, MAX_LIFETIME_S),
    )
    return signer.sign_model(claims), str(command_id)


def open_command(token: bytes, centre_key: OKPKey) -> CommandClaims:
    """Verify with the centre's key and validate strictly; every failure a SignatureInvalid with its reason."""
    if len(token) > MAX_COMMAND_BYTES:
        raise SignatureInvalid("oversized", f"{len(token)} bytes, more than {MAX_COMMAND_BYTES}")
    return decode_claims(CommandClaims, verify_opened(open_token(token), centre_key))
