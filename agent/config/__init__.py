"""Typed, validated configuration for both sides, with errors that name file:line.
Settings per side (device, centre) on shared pieces (MQTT, secrets, loading)."""
