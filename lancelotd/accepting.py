"""A worker's accepting: watching the shared listeners, accept(), refusals, the pause when out of descriptors.

Every worker watches the shared listening sockets with EPOLLEXCLUSIVE, so
the kernel wakes one worker per new connection instead of all of them (the
thundering herd).  A wake-up accepts at most ACCEPTS_PER_WAKEUP connections
(the rest of a burst is left to the other workers), through
sockets.acceptor (a plain _socket.socket per connection).  A worker at
max_connections, out of descriptors (limits.py) or yielding to a less
loaded worker (spread.py) takes its listeners out of epoll until it may
accept again: level-triggered, they would otherwise wake it in a loop.
"""

from __future__ import annotations

import select
import signal
import socket
from typing import TYPE_CHECKING

from .access import refuse
from .limits import ACCEPT_PAUSE, CLIENT_GONE
from .logs import log
from .scoreboard import SERVING
from .sockets import describe

if TYPE_CHECKING:
    from .worker import Worker

LISTEN_EVENTS = select.EPOLLIN | select.EPOLLEXCLUSIVE
ACCEPTS_PER_WAKEUP = 16  # leave the rest of a burst to the other workers


class Accepting:
    """The Worker's listeners.  Owns accepting, held and accept_paused (the others read them)."""

    def _start_accepting(self: Worker) -> None:
        if self.held:  # a USR2 successor's worker before the old master let it in: not yet
            return
        for fd, sock in self.listeners.items():
            sock.setblocking(False)  # accept() must never block the loop
            self.epoll.register(fd, LISTEN_EVENTS)
        self.accepting = True
        self._publish_load()

    def _let_in(self: Worker) -> None:
        """Held (a USR2 successor's worker): accept from now on if our master's header says so.

        Until then the old master's workers take every new connection, so a successor that
        gives up or is stopped before it was let in holds no client (docs/DESIGN.md).
        """
        try:
            held = self.spec.board.read_header().accepts_held
        except (OSError, ValueError):  # a header that never checks out: ask again next tick
            return
        if not held:
            self.held = False
            log.debug("let in: accepting")
            if self.state == SERVING and not self._full() and not self.accept_paused:
                self._start_accepting()

    def _stop_accepting(self: Worker) -> None:
        if self.accepting:
            for fd in self.listeners:
                self.epoll.unregister(fd)
            self.accepting = False
            self._publish_load()

    def _accept(self: Worker, listener: socket.socket, now: float) -> None:
        if not self.accepting:  # an event of this turn's batch from before a yield, a pause, max_connections
            return
        if self.proxied and listener.fileno() in self.proxied:
            return self._accept_proxied(listener, now, ACCEPTS_PER_WAKEUP)
        self.accept_wakeups += 1
        accepted = 0
        gate = self.gate
        share = self._share()
        accept = self.acceptors[listener.fileno()]
        conns = self.conns
        room = self.cfg.max_connections - len(self.awaiting)  # _full(), without a call per connection
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, addr = accept()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in CLIENT_GONE:  # that client is gone, not the next one
                    self.clients_gone += 1
                    log.debug("accept: %s", e.strerror)
                    continue
                self._pause_accepting(e, now)  # EMFILE...: trying again at once would spin
                break
            client = 0
            if gate is not None:
                refused, client = gate.admit(addr)
                if refused:
                    self._refuse(sock, refused, addr)
                    continue
            try:
                self._adopt(sock, now, None, addr, client)
            except OSError as e:  # epoll cannot watch it: a want of kernel resources, as EMFILE is
                self._pause_accepting(e, now)
                break
            accepted += 1
            if len(conns) >= room:
                break
            if len(conns) > share:
                self._yield_accepts()
                break
        self.counters.accepted += accepted
        if not accepted:
            self.empty_wakeups += 1
        if self._full():
            log.warning("at max_connections (%d): not accepting until one closes", self.cfg.max_connections)
            self._stop_accepting()
        elif accepted:
            self._publish_load()

    def _refuse(self: Worker, sock: socket.socket, cause: str, addr: object) -> None:
        """Closed at once, and counted by cause (access.py)."""
        refuse(sock)
        log.debug("refused %s: %s", describe(addr), cause)
        if self.access is not None:
            self.access.record(addr, 0.0, 0, 0, 0, "refused", cause)
        setattr(self.counters, cause, getattr(self.counters, cause) + 1)

    def _pause_accepting(self: Worker, error: OSError, now: float) -> None:
        """Stop watching the listeners for ACCEPT_PAUSE: level-triggered, they would wake us in a loop."""
        self.accept_pause.failure(error, now, len(self.conns))
        self._stop_accepting()
        self.accept_paused = True
        signal.setitimer(signal.ITIMER_REAL, ACCEPT_PAUSE)

    def _resume_accepting(self: Worker) -> None:
        """The pause is over: watch the listeners again, unless we retired, stop or are full.

        A listener with a queue wakes us at once (epoll reports a ready file
        when it is added); the tick says when the episode is over.
        """
        self.accept_paused = False
        if not self.accepting and self.state == SERVING and not self._full():
            self._start_accepting()
