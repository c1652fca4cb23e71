"""The agent on a call point, building button or camera box: wiring, outbox, delivery, control
socket, health, evidence serving. Never imports the centre, the installer's tools or the demo."""
