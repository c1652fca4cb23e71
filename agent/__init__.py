"""edge-agent: signed, durable alerts from call points and camera boxes to a supervision centre."""

__version__ = "0.1.0"
