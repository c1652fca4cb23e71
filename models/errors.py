"""The models package's one error; it depends on nothing of the agent's (``agent.errors`` re-exports it)."""


class ModelError(ValueError):
    """A detection model or its label file is missing, corrupt, mismatched or of an unknown kind."""
