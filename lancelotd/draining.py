"""Closing connections gently so that they move to other hosts: a mixin of the Worker.

A persistent connection cannot move between hosts, so a drained host (`lancelotd drain`, or
TERM with drain_delay) ends them itself - gently: only at an idle point (every answer sent,
no question begun, nothing unread), with the same lingering close as an idle timeout, and
spread over `drain_spread` seconds so that the clients reconnect to the other hosts
without a burst.  `max_connection_age` (+ a random `max_connection_age_jitter`) ends old
connections at an idle point too, so that after a roll the balancer can even out hosts.

A client can still cross our close with its next question; the protocol's contract for
clients (README) is to ask it again, once, on a new connection.

Runs on the worker's tick (at most once a second), never on the hot path: the drain state
comes from the scoreboard header (the master publishes balancer.py's state there).
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .agent import DRAINED, STOPPING
from .connections import OPEN, Conn, mark
from .logs import log
from .scoreboard import SERVING

if TYPE_CHECKING:
    from .worker import Worker

NEVER = float("inf")
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


@dataclass
class Due:
    """When a connection may be closed at its next idle point."""

    conn: Conn
    old_at: float  # max_connection_age (+ jitter) reached
    drain_at: float = NEVER  # its turn in the drain's spread


@dataclass
class Shedding:
    draining: bool = False
    due: dict[int, Due] = field(default_factory=dict)  # fd -> Due, rebuilt from the open connections


class Draining:
    """The Worker's gentle closes (called from Worker._tick)."""

    shedding: Shedding | None = None  # made on the first tick that needs it

    def _shed(self: Worker, now: float) -> None:
        cfg = self.cfg
        if self.state != SERVING:
            return  # retiring or stopping workers have their own ways out
        balance = self.spec.board.read_header().balance
        draining = balance in (DRAINED, STOPPING)
        if not draining and not cfg.max_connection_age and not self.shedding:
            return
        shedding = self.shedding = self.shedding or Shedding()
        if draining != shedding.draining:
            shedding.draining = draining
            log.info("host %s: %s", "drained" if draining else "undrained",
                     "closing connections at idle points" if draining else "keeping connections")
        spread = self._drain_spread(balance)
        due = {}
        closing: list[Conn] = []
        for fd, conn in self.conns.items():
            entry = shedding.due.get(fd)
            if entry is None or entry.conn is not conn:  # new here (accepted, handed over, fd reused)
                entry = Due(conn, self._old_at(now))
            if not draining:
                entry.drain_at = NEVER
            elif entry.drain_at == NEVER:
                entry.drain_at = now + spread * random.random()
            due[fd] = entry
            if min(entry.old_at, entry.drain_at) <= now and idle(conn):
                closing.append(conn)
        shedding.due = due
        for conn in closing:
            del due[conn.fd]
            mark(conn, "drain")  # for the access log (connlog.py)
            self._close_after_flush(conn)  # shut down our side and linger, as an idle timeout does
        if closing:
            log.info("closed %d connections at idle points (%s)", len(closing),
                     "host drained" if draining else "max_connection_age")
        if not draining and not cfg.max_connection_age:
            self.shedding = None

    def _drain_spread(self: Worker, balance: int) -> float:
        """Over drain_spread seconds; during drain_delay, within it (TERM closes the rest)."""
        spread = self.cfg.drain_spread
        if balance == STOPPING and self.cfg.drain_delay:
            spread = min(spread, self.cfg.drain_delay)
        return spread

    def _old_at(self: Worker, now: float) -> float:
        age = self.cfg.max_connection_age
        if not age:
            return NEVER
        return now + age + self.cfg.max_connection_age_jitter * random.random()


def idle(conn: Conn) -> bool:
    """At a question boundary with every answer sent and nothing unread: closing loses nothing."""
    if conn.state != OPEN or conn.out or conn.pending:
        return False
    try:
        conn.sock.recv(1, PEEK)
    except BlockingIOError:
        return True  # nothing waiting
    except OSError:
        return False  # the loop will see the error
    return False  # a question on its way (or EOF, which the loop handles)
