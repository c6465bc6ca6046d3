"""How a worker leaves: retiring with hand-off (reload, TTOU, upgrade, max_requests)
and stopping with a last accept sweep (TERM).  A mixin of the Worker (worker.py).
"""

from __future__ import annotations

import signal
import socket
from typing import TYPE_CHECKING

from . import handoff
from .connections import EPOLLIN, LINGER_SECONDS, OPEN
from .limits import CLIENT_GONE
from .logs import log
from .scoreboard import DRAINING, SERVING, STOPPING

if TYPE_CHECKING:
    from .worker import Worker

RECENT = 1.0  # at TERM, a connection active this recently is served this long more (see _stop)


class Retirement:
    """The Worker's ways out."""

    def _watch_channel(self: Worker, channel: socket.socket) -> None:
        self.epoll.register(channel.fileno(), EPOLLIN)

    def _take_over(self: Worker, fd: int, now: float) -> None:
        """Accept a hand-off channel; adopt connections sent on one, or sent back to us."""
        if fd == self.inbox.fileno():
            channel = handoff.accept_channel(self.inbox)
            if channel is not None:
                self.channels[channel.fileno()] = channel
                self._watch_channel(channel)
            return
        channel = self.channels.get(fd)
        outbound = channel is None
        if outbound:
            channel = self.sender.channel(fd)
            if channel is None:
                return
        received, acks, closed = handoff.receive(channel)
        for sock, pending in received:
            client = 0
            if outbound:  # a full target sent it back: we keep serving it
                self.handed_off -= 1
                client = self._came_back(fd, sock)
                log.info("a connection came back from a full worker: serving it here")
            elif self._full() and handoff.send_back(channel, sock, pending):
                continue
            else:
                handoff.acknowledge(channel)
                if self.gate is not None:
                    permitted, client = self.gate.adopt(sock)
                    if not permitted:  # a reload's new rules deny it: closed here, at a question boundary
                        self.counters.denied_open += 1
                        self._close_after_flush(self._adopt(sock, now))
                        continue
            conn = self._adopt(sock, now)
            conn.session.pending = pending
            conn.client = client
        if outbound:
            self.sender.answered(fd, acks, len(received))
            self._went_over(fd, acks)
        if closed:  # closing the socket also takes it out of the epoll set
            if outbound:
                self._went_over(fd, len(self.in_flight.get(fd, ())))  # adopted or lost: not ours now
                self.sender.forget(fd)
            else:
                del self.channels[fd]
                channel.close()

    def _hand_off(self: Worker) -> None:
        """Retiring: pass every connection at a question boundary to a current worker."""
        ready = [c for c in self.conns.values() if c.state == OPEN and not c.writing]  # nothing owed or held
        if not ready:
            return
        targets = self.sender.targets()
        handed = 0
        for conn in ready:
            if not targets or not self.sender.send(conn.sock, conn.session.pending, targets):
                break  # fallback: this worker keeps serving it (and tries again next tick)
            # Unregister first: epoll watches the open file, which lives on in the target.
            self.epoll.unregister(conn.fd)
            del self.conns[conn.fd]
            conn.sock.close()
            if self.gate is not None:  # still counted here until the target confirms (_went_over)
                self.in_flight.setdefault(self.sender.last_channel, []).append(conn.client)
            handed += 1
        if handed:
            self.handed_off += handed
            log.info("handed %d connections over (%d left)", handed, len(self.conns))

    def _went_over(self: Worker, channel_fd: int, acks: int) -> None:
        """The target confirmed `acks` connections (in the order sent): no longer counted here."""
        flight = self.in_flight.get(channel_fd)
        if not flight or self.gate is None:
            return
        for client in flight[:acks]:
            if client:
                self.gate.release(client)
        del flight[:acks]

    def _came_back(self: Worker, channel_fd: int, sock: socket.socket) -> int:
        """A connection a full target sent back: the count it had here (it never left) goes on."""
        flight = self.in_flight.get(channel_fd)
        if not flight or self.gate is None:
            return 0
        client = self.gate.fingerprint_of(sock)
        if client in flight:  # same address, same count: which of its connections does not matter
            flight.remove(client)
            return client
        return 0

    def _close_listeners(self: Worker) -> None:
        self._stop_accepting()
        for sock in self.listeners.values():
            sock.close()  # our copy only: never shutdown() a shared listener
        self.listeners.clear()  # the loop holds this very dict

    def _drain(self: Worker, now: float) -> None:
        """Retire: accept no more, keep serving until clients leave or graceful_timeout."""
        if self.state != SERVING:
            return
        self._close_listeners()
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
        self._last_sweep(now)
        self._close_listeners()
        self._set_state(STOPPING, now)
        recent = now - RECENT
        waiting = False
        for conn in list(self.conns.values()):
            if conn.state == OPEN:
                if conn.last > recent:
                    waiting = True
                else:
                    self._answer_received(conn)
        # (Replaces the alarm of an accept pause: stopping, we accept no more.)
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
        for listener in self.listeners.values():
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
                        self._refuse(sock, refused)
                        continue
                sock.setblocking(False)
                self._adopt(sock, now).client = client
                self.counters.accepted += 1

    def _close_open(self: Worker) -> None:
        """Stopping: answer what the open connections sent, then close them."""
        for conn in list(self.conns.values()):
            if conn.state == OPEN:
                self._answer_received(conn)
