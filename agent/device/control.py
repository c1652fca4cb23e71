"""The local control socket: ``edge-agent status`` and ``edge-agent test-alert`` talk to the running agent.

A UNIX stream socket (mode 0660, so the service user and its group only), one
JSON object per line each way: ``{"command": "status"}`` →
``{"ok": true, ...}``. Unknown commands and malformed requests get
``{"ok": false, "error": "..."}`` naming what was wrong.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import AgentError, ControlError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_REQUEST_BYTES = 64 * 1024


class ControlServer:
    """Serves named commands on a UNIX socket from a background thread."""

    def __init__(self, path: Path, handlers: dict[str, Handler]):
        self.path = Path(path)
        self.handlers = handlers
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        server = self

        class _Request(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    line = self.rfile.readline(MAX_REQUEST_BYTES)
                except OSError as exc:
                    log.info("control client went away before its request was read: %s", exc)
                    return
                reply = server.dispatch(line)  # runs to the end even if the client has gone: a test alert is stored
                try:
                    self.wfile.write(json.dumps(reply).encode() + b"\n")
                except OSError as exc:  # BrokenPipe, ConnectionReset: the client did not wait for the reply
                    log.info("control client went away before the reply to %s: %s", _command_of(line), exc)

        old_umask = os.umask(0o117)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(self.path), _Request)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o660)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not a JSON object on one line"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": "request needs a string field 'command'"}
        command = request["command"]
        handler = self.handlers.get(command)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown command {command!r}; known commands: {known}"}
        try:
            return {"ok": True, **handler(request)}
        except AgentError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not kill the control thread
            log.exception("control command %r failed", command)
            return {"ok": False, "error": f"command {command!r} failed: {exc}"}


def _command_of(line: bytes) -> str:
    """The command named in a request line, for a log message (the line is hostile input)."""
    try:
        command = json.loads(line).get("command")
    except (ValueError, AttributeError):
        return "an unreadable request"
    return repr(command[:40]) if isinstance(command, str) else "an unreadable request"


def request(path: Path, command: str, timeout: float = 10.0, **arguments: Any) -> dict[str, Any]:
    """Send one command to a running agent and return its reply; raises ControlError on failure."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": command, **arguments}).encode() + b"\n")
            with sock.makefile("rb") as stream:
                line = stream.readline(MAX_REQUEST_BYTES)
    except FileNotFoundError:
        raise ControlError(f"no agent is listening on {path} (is edge-agent running with this config?)") from None
    except PermissionError:
        raise ControlError(f"not allowed to use {path}; run as the service user or a member of its group") from None
    except OSError as exc:
        raise ControlError(f"cannot talk to the agent on {path}: {exc}") from None
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError(f"the agent on {path} sent an unreadable reply") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "the agent refused the command"))
    return reply
