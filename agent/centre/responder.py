"""At the centre: tells a device that help is coming for one of its alerts ("responding", signed).

Only a call point's own, non-silent button alert is ever answered this way: a silent or duress
alert must look, at the device, exactly as if nobody had seen it. The message names the alert,
never the operator.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from agent.centre.store import StoredMessage
from agent.protocol.messages import RespondingClaims, TopicLayout
from agent.protocol.signing import MessageSigner

log = logging.getLogger(__name__)

#: Alert kinds that are never revealed at the device, whatever their ``silent`` flag says.
NEVER_REVEALED_KINDS = frozenset({"duress"})


def may_reveal(alert: StoredMessage) -> bool:
    """True only for a button alert that is explicitly not silent and not duress (fail closed).

    Test alerts may show it: an installer sees the whole loop work. Camera and other events are
    not answered: they have no button whose person waits for an answer.
    """
    body = alert.claims.get("body")
    if alert.kind != "alert" or not isinstance(body, dict):
        return False
    return body.get("silent") is False and body.get("alert_kind") not in NEVER_REVEALED_KINDS


class Responder:
    """Tells a device that help is coming for one of its alerts, signed with the centre's key."""

    def __init__(
        self, signer: MessageSigner, topics: TopicLayout, publish: Callable[[str, bytes], None], centre_id: str
    ):
        self._signer = signer
        self._topics = topics
        self._publish = publish
        self._centre_id = centre_id

    def help_is_coming(self, alert: StoredMessage) -> bool:
        """Sign and publish the 'responding' message for a stored alert; False (nothing sent) for one it must not reveal.

        Never reveals a silent or duress alert (see ``may_reveal``). Whatever ``publish`` raises (the
        link is down, say) propagates: the caller learns the device was not told.
        """
        if not may_reveal(alert):
            log.info("no 'responding' sent for %s seq %d: not a visible button alert", alert.device, alert.seq)
            return False
        claims = RespondingClaims(
            kind="responding",
            centre=self._centre_id,
            device=alert.device,
            seq=alert.seq,
            event_id=alert.event_id,
            id=uuid.uuid4(),
            sent=time.time(),
        )
        token = self._signer.sign_model(claims).encode()
        self._publish(self._topics.topic(alert.site, alert.device, "ack"), token)
        log.info("told %s/%s that help is coming for seq %d", alert.site, alert.device, alert.seq)
        return True
