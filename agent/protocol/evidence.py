"""Evidence images travel separately from alerts, only when the centre asks, and only sealed for the centre.

An alert carries ``evidence: {ref, sha256}``. The centre publishes a request signed with its key on
``…/evidence-request``; the device checks the signature, the request's age and that its id was never
answered before, and replies on ``…/evidence`` with the JPEG sealed for the centre (JWE), signed with
the device key. This module holds what both sides agree on: the limits and the errors.
"""

from __future__ import annotations

import re

from agent.errors import AgentError

REQUEST_MAX_AGE_S = 60.0


USED_ID_MARGIN_S = REQUEST_MAX_AGE_S


_NAME = re.compile(r"^evidence/([0-9a-f-]{36}\.jpg)$")


class EvidenceError(AgentError, LookupError):
    """Evidence could not be fetched: not found, expired, or not what the alert promised."""


class RequestRefused(EvidenceError):
    """An evidence request the device does not answer; ``reason`` is the counter it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ReplyIgnored(EvidenceError):
    """A message on the evidence topic that is not the authentic answer to our request (keep waiting)."""
