"""One error tree for the whole agent.

Every exception also inherits the builtin it resembles, so callers that only
know Python's own exceptions still catch them sensibly. Messages say what
failed, with which value, and what to do about it.
"""

from models.errors import ModelError as _ModelError


class AgentError(Exception):
    """Base of every error raised by edge-agent."""


class ConfigError(AgentError, ValueError):
    """A configuration file is missing, unreadable or invalid.

    ``problems`` holds one human-readable line per problem found, so a
    validator can report all of them at once instead of the first.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class KeyFileError(AgentError, OSError):
    """A key file is missing, has unsafe permissions, or does not hold a usable key."""


class OutboxError(AgentError, RuntimeError):
    """The durable outbox could not store or read a message."""


class UplinkError(AgentError, ConnectionError):
    """The MQTT transport refused an operation (carries paho's code as ``[code:N]``)."""


class SignatureInvalid(AgentError, ValueError):
    """A signed message failed verification.

    ``reason`` is a short stable token (``bad_signature``, ``unknown_device``…)
    used for counters and logs; the message explains it for humans.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ControlError(AgentError, RuntimeError):
    """The local control socket could not be reached or refused a command."""


class BrokerUnavailable(AgentError, RuntimeError):
    """A local mosquitto broker (demo, tests, benchmarks) could not be started."""


class MosquittoMissing(BrokerUnavailable):
    """The mosquitto binary is not installed."""


# The models package keeps its own error so that it does not import the agent (no package cycle).
ModelError = _ModelError


class CameraError(AgentError, OSError):
    """A camera source could not be opened or stopped delivering frames."""


class RedactionUnavailable(AgentError, RuntimeError):
    """A picture cannot be redacted (face model missing or failing): it is withheld, never written unredacted."""
