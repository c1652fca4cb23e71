"""The installer's tools: provision, selftest, detect/snapshot. May use both sides."""
