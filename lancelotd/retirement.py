"""How a worker leaves: retiring with hand-off (reload, TTOU, upgrade, max_requests)
and stopping with a last accept sweep (TERM).  A mixin of the Worker (worker.py).
"""

from __future__ import annotations

import signal
import socket
import time
from typing import TYPE_CHECKING

from . import rendezvous as wire
from .connections import EPOLLIN, LINGER_SECONDS, OPEN, Conn, mark
from .limits import CLIENT_GONE
from .logs import log
from .scoreboard import DRAINING, SERVING, STOPPING
from .sockets import describe

if TYPE_CHECKING:
    from .worker import Worker

STUCK_LOG_EVERY = 5.0  # seconds between two "wait for a target" lines of a retiring worker
RECENT = 1.0  # at TERM, a connection active this recently is served this long more (see _stop)


class Retirement:
    """The Worker's ways out."""

    # --- the hand-off's host (handoff.Host) ---------------------------------

    def refusal(self: Worker) -> bytes | None:
        """Why we cannot adopt a connection handed to us now, or None."""
        if self.state != SERVING:
            return wire.LEAVING  # its sender knows better targets than we would
        if self._full():
            return wire.FULL
        return None

    def adopt_handed(self: Worker, sock: socket.socket, pending: bytes, now: float, last: float,
                     peer: tuple | None) -> bool:
        """A connection handed to us: ours from now on, with its idle timer, unfinished question
        and client address (None: the socket's peer; from a PROXY header, it is not).

        Our access rules apply (a reload may have changed them): one they deny now is closed
        here, at this question boundary, and counted.  False: epoll cannot watch it (out of
        kernel memory); our copy of the socket is closed, and the sender may serve it again.
        """
        if peer is None:
            try:
                peer = sock.getpeername()
            except OSError:  # the client is gone already: its connection will find out itself
                pass
        permitted, client = self.gate.adopt(peer) if self.gate is not None else (True, 0)
        try:
            conn = self._adopt(sock, now, last, peer, client)
        except OSError as e:
            log.warning("cannot watch a connection handed over from %s: %s", describe(peer), e.strerror)
            return False
        if permitted:
            conn.pending = pending
        else:
            self.counters.denied_open += 1
            mark(conn, "refused")  # for the access log (connlog.py)
            log.debug("closing %s: a reload's rules deny it", describe(peer))
            self._close_after_flush(conn)
        return True

    def handed(self: Worker, conn: Conn) -> None:
        """A connection we sent was adopted: it no longer counts against its client here."""
        if self.access is not None:
            self.access.closed(conn, "handoff")  # the new worker writes its own line when it ends
        if conn.client:
            self.gate.release(conn.client)

    def lend(self: Worker, conn: Conn) -> None:
        """The hand-off has sent `conn`: it leaves our table and epoll set until it comes back."""
        del self.conns[conn.fd]
        self.epoll.unregister(conn.fd)

    def resume(self: Worker, conn: Conn, now: float) -> None:
        """A connection we sent was not adopted: serve it again (with what it sent meanwhile).

        The hand-off gives back only what it holds in flight, and holds each connection on one
        channel once (handoff.HandOff.offer): a connection we serve is never given back.
        """
        if self.conns.get(conn.fd) is conn:
            log.error("a connection to %s came back while we serve it: ignored", describe(conn.peer))
            return
        try:
            self.epoll.register(conn.fd, EPOLLIN)
        except OSError as e:  # ENOMEM, ENOSPC: it cannot be served here either
            log.warning("cannot watch %s again: %s; closing it", describe(conn.peer), e.strerror)
            conn.sock.close()
            if conn.client:
                self.gate.release(conn.client)
            return
        self.conns[conn.fd] = conn

    def _take_over(self: Worker, fd: int, now: float) -> None:
        """Our hand-off inbox or a channel is ready."""
        if self.handoff.on_event(fd, now) and self.state == DRAINING:
            self._hand_off()  # a target answered: room for more, or connections back to place

    def _hand_off(self: Worker) -> None:
        """Retiring: pass every connection at a question boundary to a current worker."""
        ready = [c for c in self.conns.values() if c.state == OPEN and not c.writing]  # nothing owed or held
        if not ready:
            return
        now = time.monotonic()
        sent = self.handoff.offer(ready, now)  # each lent to it as it went (lend)
        if not sent and now >= self.stuck_logged + STUCK_LOG_EVERY:
            self.stuck_logged = now  # the soak's open case: a retiring worker that never finds a target
            log.info("%d connections wait for a target: %s", len(ready), self.handoff.why_none or "all busy")
        if sent:
            log.info("handed %d connections over (%d left)", len(sent), len(self.conns))

    def _done(self: Worker, now: float) -> bool:
        """Not serving: may we exit?  Not while we hold connections (PROXY headers on their way
        included), or the hand-off does."""
        return not self.conns and not self.awaiting and self.handoff.finished(now) and not self.conns

    def _close_listeners(self: Worker) -> None:
        self._stop_accepting()
        self.yielding = None  # a yield under way ends here (spread.py)
        self._publish_load()
        for sock in self.listeners.values():
            sock.close()  # our copy only: never shutdown() a shared listener
        self.listeners.clear()  # the loop holds this very dict

    def _drain(self: Worker, now: float) -> None:
        """Retire: accept no more, keep serving until clients leave or graceful_timeout."""
        if self.state != SERVING:
            return
        self._close_listeners()
        self.handoff.stop_receiving()
        self.deadline = now + self.cfg.graceful_timeout
        self._set_state(DRAINING, now)
        self._hand_off()

    def _stop(self: Worker, now: float) -> None:
        """TERM: answer every complete question already received, then close.

        A connection active in the last RECENT seconds (just accepted, or just
        answered) may have its next question on the way: it is served RECENT
        seconds more (the alarm), then closed the same way.
        """
        if self.state == STOPPING:
            return
        # From serving: graceful_timeout to finish; from an expired drain: time to flush.
        self.deadline = now + (self.cfg.graceful_timeout if self.state == SERVING else LINGER_SECONDS)
        if not self.held:  # a held worker's queue is the old master's, whose workers serve it
            self._last_sweep(now)
        self._close_listeners()
        self.handoff.stop_receiving()
        self._set_state(STOPPING, now)
        recent = now - RECENT
        waiting = False
        for conn in list(self.conns.values()):
            if conn.state == OPEN:
                if conn.last > recent:
                    waiting = True
                else:
                    self._answer_received(conn)
        # (Replaces the alarm of an accept pause or a yield: stopping, we accept no more.
        # One of theirs may be queued already: _alarm ignores it before stop_wait_ends.)
        self.stop_wait_ends = now + RECENT
        signal.setitimer(signal.ITIMER_REAL, RECENT if waiting else 0)

    def _last_sweep(self: Worker, now: float) -> None:
        """Accept what is queued on the listeners before closing our copy of them.

        The master closes its copy at TERM; whoever closes the listening socket
        last makes the kernel reset every connection still queued on it.  So
        each worker takes the queue until EAGAIN and serves it: a connection
        queued now is served, one that comes after the last close is refused
        (a client can retry that), none is accepted by the kernel and then reset.
        (Only the instants between the last sweep's EAGAIN and its close() remain.)
        Bounded: while another worker still holds the socket, a connect flood
        would refill the queue as fast as we empty it, so at most `backlog`
        accepts per listener - all the queue could hold when we began - and
        never past max_connections.  Socket-activated listeners get the same
        sweep: systemd keeps its copy, so nothing is reset there anyway.
        """
        for fd, listener in self.listeners.items():
            if fd in self.proxied:  # into the header state: served once the header is read
                self._sweep_proxied(listener, now)
                continue
            for _ in range(self.cfg.backlog):
                if self._full():
                    return
                try:
                    sock, addr = listener.accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in CLIENT_GONE:
                        continue
                    log.warning("last accept sweep stopped: %s", e.strerror)
                    return
                client = 0
                if self.gate is not None:
                    refused, client = self.gate.admit(addr)
                    if refused:
                        self._refuse(sock, refused, addr)
                        continue
                sock.setblocking(False)
                try:
                    self._adopt(sock, now, None, addr, client)
                except OSError as e:
                    log.warning("last accept sweep stopped: %s", e.strerror)
                    return
                self.counters.accepted += 1

    def _close_open(self: Worker) -> None:
        """Stopping: answer what the open connections sent, then close them."""
        for conn in list(self.conns.values()):
            if conn.state == OPEN:
                self._answer_received(conn)
