"""The MQTT transport: the only package that imports paho. Both sides use it."""
