"""Store-and-forward to one alarm receiving centre over SIA DC-09 (TCP).

One thread per ARC takes the oldest undelivered rows of the forwarding outbox, one account at a
time in order, sends each as a DC-09 frame and waits for the answer. Only an ACK marks a row
delivered. A NAK or DUH puts that account's head back with a growing delay (the other accounts go
on); silence or a lost connection fails the path, and the next attempt goes to the other path
(primary and backup, as EN 50136-1 dual-path transmission), with backoff while neither answers.
A NAK carries the ARC's clock: when ours is off by more than DC-09's window the forwarder corrects
its timestamps and sends again at once. A NULL message supervises the path when nothing else was
sent for ``null_interval_s``. Faults (refused messages, unreadable answers, unreachable paths) are
logged once when they start and once when they end, counted, and kept for ``receiver forwarders``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

from agent.centre.dc09 import FrameError, FrameReader, Reply, Route, build_message, parse_reply
from agent.centre.forward_queue import ForwardQueue, QueuedForward
from agent.config.forward import ArcSection, split_host_port
from agent.runtime.backoff import Backoff
from agent.runtime.guard import LoopGuard

log = logging.getLogger(__name__)

#: Another receiver may take over an ARC this long after the holder stopped renewing.
LEASE_S = 30.0
#: DC-09 accepts timestamps up to 40 s old and 20 s ahead: a NAK whose clock differs from ours by more than
#: 20 s says ours is off.
CLOCK_TOLERANCE_S = 20.0
#: NAKs in a row (with the clock agreeing) before the ARC is said to refuse us.
NAKS_FOR_FAULT = 2
POLL_S = 0.5
CONNECT_TIMEOUT_S = 5.0


class PathFailed(Exception):
    """The path to the ARC gave no usable answer: not connected, closed, silent or unreadable."""


class ArcLink:
    """One TCP connection to one of the ARC's paths; answers are matched to the frame just sent."""

    def __init__(self, path: str, sock: socket.socket):
        self.path = path
        self.sock = sock
        self.opened_at = time.monotonic()
        self._reader = FrameReader()

    @classmethod
    def open(cls, path: str, address: str, timeout: float) -> ArcLink:
        return cls(path, socket.create_connection(split_host_port(address), timeout=timeout))

    def exchange(self, frame: bytes, seq: int, account: str, key: bytes | None, timeout: float) -> Reply:
        """Send a frame; the ARC's answer to it (a NAK answers whatever came last), or PathFailed."""
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            raise PathFailed(f"send failed on the {self.path} path: {exc}") from None
        deadline = time.monotonic() + timeout
        problem = f"no answer within {timeout:g} s on the {self.path} path"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                self.sock.settimeout(remaining)
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            except OSError as exc:
                raise PathFailed(f"the {self.path} path failed: {exc}") from None
            if not data:
                raise PathFailed(f"the ARC closed the connection on the {self.path} path")
            for raw in self._reader.feed(data):
                try:
                    reply = parse_reply(raw, key)
                except FrameError as exc:
                    problem = f"unreadable answer on the {self.path} path ({exc})"
                    continue
                if reply.kind == "NAK" or (reply.seq == seq and reply.account in (None, account)):
                    return reply  # anything else answers an earlier frame (or someone else): ignored
        raise PathFailed(problem)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class ArcForwarder:
    """Delivers one ARC's share of the outbox, in order per account, until each row is ACKed."""

    def __init__(
        self,
        settings: ArcSection,
        queue: ForwardQueue,
        key: bytes | None,
        holder: str,
        clock: Callable[[], float] = time.time,
        retention_s: float = 90 * 86400,
    ):
        self.settings = settings
        self.retention_s = retention_s  # delivered rows are kept this long, for the record
        self.name = settings.name
        self.queue = queue
        self.key = key
        self.holder = holder
        self.clock = clock
        # One step may wait for two connects (5 s each) and an answer: not a stuck loop.
        self.guard = LoopGuard(f"arc-{settings.name}", stall_s=settings.ack_timeout_s + 2 * CONNECT_TIMEOUT_S + 5)
        self.counts: Counter[str] = Counter()  # answers by kind, path failures, faults
        self.fault: str | None = None
        self.path: str | None = None
        self.clock_offset_s = 0.0  # the ARC's clock minus ours, learnt from its NAKs
        self._paths = [("primary", settings.primary)] + ([("backup", settings.backup)] if settings.backup else [])
        self._link: ArcLink | None = None
        self._prefer = 0  # index into _paths tried first: after a failure, the other path
        self._reconnect = Backoff(settings.retry_first_s, settings.retry_max_s)
        self._connect_after = 0.0  # monotonic
        self._blocked: dict[str, float] = {}  # account -> when its head may be tried again (wall clock)
        self._naks: Counter[str] = Counter()  # NAKs in a row, by account
        self._path_fault: str | None = None  # the path: unreachable, or answers we cannot read
        self._refusals: dict[str, str] = {}  # account -> why the ARC keeps refusing its oldest event
        self._last_sent = time.monotonic()
        self._lease_until = 0.0
        self._next_prune = 0.0  # monotonic
        self._stop = threading.Event()
        self._wake = threading.Event()
        accounts = [a.account for a in settings.accounts]
        self._null_account = settings.default_account or (accounts[0] if accounts else None)

    def __repr__(self) -> str:
        return f"<ArcForwarder {self.name} path={self.path} fault={self.fault!r}>"

    def start(self) -> None:
        self.queue.register(self.name)
        self.guard.start(self._run)

    def wake(self) -> None:
        """Something was queued: look now rather than at the next poll."""
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self.guard.join(timeout=self.settings.ack_timeout_s + 5)
        self._drop_link()
        try:
            self.queue.release(self.name, self.holder)
            self.queue.note_state(self.name, self.clock(), connected=0)
        except OSError as exc:
            log.warning("ARC %s: could not record the stop: %s", self.name, exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.guard.beat()
            wait = POLL_S
            with self.guard.step("forward"):
                wait = self._step()
            if wait > 0:
                self._wake.wait(min(wait, POLL_S))
            self._wake.clear()

    def _step(self) -> float:
        """Send what is due; the time until something may be due again."""
        now = self.clock()
        if not self._hold_lease(now):
            return POLL_S
        if time.monotonic() < self._connect_after:
            return self._connect_after - time.monotonic()
        self._blocked = {account: until for account, until in self._blocked.items() if until > now}
        rows = self.queue.assign_seqs(self.name, self.queue.pending(self.name, list(self._blocked)))
        for row in rows:
            self.guard.beat()
            if self._stop.is_set():
                return 0
            if row.account in self._blocked:
                continue
            if row.next_at > now:
                self._blocked[row.account] = row.next_at
                continue
            if not self._deliver(row) and self._link is None:
                return POLL_S  # the path failed: the backoff decides when to try again
        if time.monotonic() - self._last_sent >= self.settings.null_interval_s:
            self._supervise()
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + 3600
            self.queue.prune(self.name, now - self.retention_s)
        return 0 if len(rows) >= 100 else POLL_S

    def _hold_lease(self, now: float) -> bool:
        """Renew the lease a third of the way through; without it, another receiver sends for this ARC."""
        if now < self._lease_until - LEASE_S * 2 / 3:
            return True
        held = self.queue.claim(self.name, self.holder, now, LEASE_S)
        if not held and self._lease_until:
            log.info("ARC %s: another receiver sends for it now", self.name)
            self._drop_link()
        self._lease_until = now + LEASE_S if held else 0.0
        return held

    def _deliver(self, row: QueuedForward, retried: bool = False) -> bool:
        """Send one row and act on the answer; True once it is acknowledged."""
        seq = row.dc09_seq or self.queue.assign_seqs(self.name, [row])[0].dc09_seq
        route = Route(self.settings.receiver_number, self.settings.line_number, row.account)
        frame = build_message(row.protocol, seq, route, row.data, self._now(), self.key)
        try:
            reply = self._exchange(frame, seq, row.account)
        except PathFailed as exc:
            self.queue.failed(row.id, str(exc), self.clock())
            return False
        if reply.kind in ("ACK", "RSP"):
            self.queue.delivered(self.name, row.id, self.clock())
            self._naks.pop(row.account, None)
            if self._refusals.pop(row.account, None) is not None or self._path_fault:
                self._path_fault = None
                self._show_fault()
            return True
        if reply.kind == "NAK" and not retried and self._learn_clock(reply):
            return self._deliver(row, retried=True)  # timestamps corrected: once more at once
        self._refused(row, seq, reply)
        return False

    def _refused(self, row: QueuedForward, seq: int, reply: Reply) -> None:
        """A NAK or DUH: this account's head waits (longer each time), the others go on."""
        now = self.clock()
        delay = min(self.settings.retry_max_s, self.settings.retry_first_s * 2 ** min(row.attempts, 20))
        why = (
            "NAK: the ARC refused it (wrong key, account or format?)"
            if reply.kind == "NAK"
            else "DUH: the ARC did not understand the event"
        )
        self.queue.failed(row.id, why, now + delay)
        self._blocked[row.account] = now + delay
        if reply.kind == "NAK":
            self._naks[row.account] += 1
            self.queue.note_state(self.name, now, last_nak_at=now, last_nak=f"account {row.account} seq {seq}")
        if reply.kind == "DUH" or self._naks[row.account] >= NAKS_FOR_FAULT:
            if row.account not in self._refusals:
                self._refusals[row.account] = f"{why}; account {row.account}: {row.what}"
                self._show_fault()

    def _learn_clock(self, reply: Reply) -> bool:
        """True if a NAK says our clock is off (its own time differs by more than the window): now corrected."""
        if reply.timestamp is None:
            return False
        off = reply.timestamp - self._now()
        if abs(off) <= CLOCK_TOLERANCE_S:
            return False
        self.clock_offset_s += off
        log.warning("ARC %s: its NAK says our clock is off by %+.0f s; timestamps corrected", self.name, -off)
        self.counts["clock_corrected"] += 1
        return True

    def _supervise(self) -> None:
        """A NULL message (DC-09 link test) when the path has been quiet for the supervision interval."""
        if self._null_account is None:
            return
        seq = self.queue.next_seq(self.name)
        route = Route(self.settings.receiver_number, self.settings.line_number, self._null_account)
        try:
            reply = self._exchange(
                build_message("NULL", seq, route, "", self._now(), self.key), seq, self._null_account
            )
        except PathFailed:
            return
        if reply.kind == "NAK" and self._learn_clock(reply):
            return
        if reply.kind in ("ACK", "RSP"):
            self.queue.note_state(self.name, self.clock(), last_ack_at=self.clock())
            if self._path_fault:
                self._path_fault = None
                self._show_fault()

    def _exchange(self, frame: bytes, seq: int, account: str) -> Reply:
        link = self._connected()
        try:
            reply = link.exchange(frame, seq, account, self.key, self.settings.ack_timeout_s)
        except PathFailed as exc:
            self._path_failed(link.path, str(exc))
            raise
        self._last_sent = time.monotonic()
        self.counts[reply.kind] += 1
        return reply

    def _connected(self) -> ArcLink:
        """The open link, else a new one: the preferred path, then the other; PathFailed if none answers."""
        link = self._link
        if (
            link is not None
            and link.path == "backup"
            and time.monotonic() - link.opened_at > self.settings.primary_retry_s
        ):
            self._drop_link()  # back to the primary when it answers again
            self._prefer, link = 0, None
        if link is not None:
            return link
        order = self._paths[self._prefer :] + self._paths[: self._prefer]
        problems = []
        for path, address in order:
            try:
                self._link = ArcLink.open(path, address, min(self.settings.ack_timeout_s, CONNECT_TIMEOUT_S))
            except OSError as exc:
                problems.append(f"{path} {address}: {exc.strerror or exc}")
                continue
            self._reconnect.reset()
            self._set_path(path)
            return self._link
        self.counts["path_failures"] += 1
        self._connect_after = time.monotonic() + self._reconnect.next()
        self._path_fault = "cannot reach the ARC: " + "; ".join(problems)
        self._show_fault()
        raise PathFailed(self._path_fault)

    def _path_failed(self, path: str, reason: str) -> None:
        self.counts["path_failures"] += 1
        log.debug("ARC %s: %s", self.name, reason)  # the fault below is logged when it starts and ends
        self._drop_link()
        self._prefer = 1 if path == "primary" and len(self._paths) > 1 else 0
        self._path_fault = reason
        self._show_fault()
        self._connect_after = time.monotonic() + (
            0 if len(self._paths) > 1 and path == "primary" else self._reconnect.next()
        )

    def _drop_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
            self._set_path(None)

    def _set_path(self, path: str | None) -> None:
        if path == self.path:
            return
        self.path = path
        if path:
            log.info("ARC %s: connected on the %s path", self.name, path)
        self.queue.note_state(self.name, self.clock(), connected=int(path is not None), path=path)

    def _show_fault(self) -> None:
        """The path's fault first; else the accounts the ARC refuses (it may refuse one and take the others)."""
        refusals = list(self._refusals.values())
        if len(refusals) > 1:
            refusals = [f"{refusals[0]} (and {len(refusals) - 1} more account(s))"]
        self._set_fault(self._path_fault or (refusals[0] if refusals else None))

    def _set_fault(self, fault: str | None) -> None:
        """Log a fault once when it starts and once when it ends; keep it for operators."""
        if fault == self.fault:
            return
        if fault:
            log.error("ARC %s FAULT: %s", self.name, fault)
            self.counts["faults"] += 1
        else:
            log.info("ARC %s: fault cleared (%s)", self.name, self.fault)
        self.fault = fault
        self.queue.note_state(self.name, self.clock(), fault=fault)

    def _now(self) -> float:
        """Our clock, corrected by what the ARC's NAKs said: the time put in every frame."""
        return self.clock() + self.clock_offset_s
