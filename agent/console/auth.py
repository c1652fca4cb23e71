"""Operators' logins: argon2 password hashes, server-side sessions with a CSRF token, a login rate limit.

Sessions live in the console process (a random token in an HttpOnly, SameSite=Strict cookie): logging
out or restarting the console ends them, and nothing about the operator is in the cookie itself.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from agent.console.state import ROLES, ConsoleState

#: What each role may do; checked on the server for every request, whatever the page shows.
PERMISSIONS: dict[str, frozenset[str]] = {
    "operator": frozenset({"view", "handle", "evidence"}),
    "supervisor": frozenset({"view", "handle", "evidence", "audit", "reassign"}),
    "installer": frozenset({"view"}),
}
assert set(PERMISSIONS) == set(ROLES)

_HASHER = PasswordHasher()  # argon2id with the library's current (RFC 9106) parameters
#: Verified against when the account does not exist, so a wrong name takes as long as a wrong password.
_DUMMY_HASH = _HASHER.hash(secrets.token_hex(16))


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


@dataclass
class Session:
    token: str
    operator: str
    role: str
    csrf: str
    last_used: float
    permissions: frozenset[str] = field(default_factory=frozenset)

    def may(self, permission: str) -> bool:
        return permission in self.permissions


class LoginRefused(Exception):
    """Why a login failed, in words fit for the login page (never which of name or password was wrong)."""


#: An address (all of a centre's operators may share one, behind the TLS proxy) is refused only after this
#: many times the per-name attempts: guessing across names is stopped, one mistyping operator locks out only
#: their own name.
ADDRESS_FACTOR = 4


class LoginLimiter:
    """After ``attempts`` wrong passwords in a row for a name (or ADDRESS_FACTOR times as many from one
    address, whatever the names), refuse it for ``lockout_s``."""

    def __init__(self, attempts: int, lockout_s: float, clock: Callable[[], float] = time.monotonic):
        self.attempts = attempts
        self.lockout_s = lockout_s
        self.clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (failures in a row, time of the last)
        self._lock = threading.Lock()

    def refused(self, *keys: str) -> bool:
        now = self.clock()
        with self._lock:
            for key in keys:
                limit = self.attempts * (ADDRESS_FACTOR if key.startswith("address:") else 1)
                count, last = self._failures.get(key, (0, 0.0))
                if count >= limit and now - last < self.lockout_s:
                    return True
                if count >= limit:  # the lockout is over: a fresh start
                    self._failures.pop(key, None)
        return False

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                count, last = self._failures.get(key, (0, 0.0))
                if now - last > self.lockout_s:  # old mistakes do not add up over a shift
                    count = 0
                self._failures[key] = (count + 1, now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


class Sessions:
    """Log operators in and out; find the session a request's cookie names."""

    def __init__(
        self, state: ConsoleState, limiter: LoginLimiter, idle_s: float, clock: Callable[[], float] = time.monotonic
    ):
        self.state = state
        self.limiter = limiter
        self.idle_s = idle_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def login(self, name: str, password: str, address: str) -> Session:
        """A new session for the right name and password; LoginRefused otherwise (and counted)."""
        keys = (f"name:{name}", f"address:{address}")
        if self.limiter.refused(*keys):
            raise LoginRefused("too many failed logins: refused for a while; ask a supervisor if this was not you")
        account = self.state.operator(name)
        stored_hash, role = account if account is not None else (_DUMMY_HASH, "")
        try:
            _HASHER.verify(stored_hash, password)
        except (VerificationError, InvalidHashError):
            account = None
        if account is None:
            self.limiter.failed(*keys)
            raise LoginRefused("wrong name or password")
        self.limiter.succeeded(*keys)
        if _HASHER.check_needs_rehash(stored_hash):
            self.state.set_password_hash(name, _HASHER.hash(password))
        session = Session(
            secrets.token_urlsafe(32), name, role, secrets.token_urlsafe(32), self.clock(), PERMISSIONS[role]
        )
        with self._lock:
            self._sessions[session.token] = session
        return session

    def find(self, token: str | None) -> Session | None:
        """The live session for a cookie's token (its idle clock restarted), or None."""
        if not token:
            return None
        now = self.clock()
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return None
            if now - session.last_used > self.idle_s:
                del self._sessions[token]
                return None
            session.last_used = now
            return session

    def logout(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(token, None)


def same_token(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a submitted CSRF token."""
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())
