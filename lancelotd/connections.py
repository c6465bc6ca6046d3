"""A worker's connections: adopting, writing, closing without a reset, expiring (SPEC §1).

A mixin of the Worker (worker.py), whose loop handles the hot path itself:
this is everything a connection needs besides one recv and one send.
"""

from __future__ import annotations

import select
import socket
import time
from typing import TYPE_CHECKING

from .protocol import NOT_ASCII, TOO_LONG, AnswerTable, Session
from .scoreboard import DRAINING, SERVING

if TYPE_CHECKING:
    from .worker import Worker

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
RECV_SIZE = 65536
LINGER_SECONDS = 2.0  # how long a closing connection may still send us bytes

# Connection states
OPEN, CLOSE_AFTER_FLUSH, LINGERING = 0, 1, 2


class Conn:
    __slots__ = ("sock", "fd", "session", "out", "last", "state", "client")

    def __init__(self, sock: socket.socket, table: AnswerTable, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.session = Session(table)
        self.out = b""  # answers the kernel has not taken yet
        self.last = now  # when the last complete question arrived (or accept)
        self.state = OPEN
        self.client = 0  # its fingerprint in the per-client counts (access.py), 0 = not counted


class Connections:
    """Per-connection mechanics of the Worker."""

    def _adopt(self: Worker, sock: socket.socket, now: float) -> Conn:
        conn = Conn(sock, self.table, now)
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, EPOLLIN)
        return conn

    def _full(self: Worker) -> bool:
        return len(self.conns) >= self.cfg.max_connections

    def _flush(self: Worker, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            return
        if conn.state == CLOSE_AFTER_FLUSH:
            self._close(conn)
        else:
            self.epoll.modify(conn.fd, EPOLLIN)
            if self.state == DRAINING:
                self._hand_off()  # its answers are out: now it can go

    def _protocol_error(self: Worker, conn: Conn, out: bytes) -> None:
        if out.endswith(TOO_LONG):
            self.counters.too_long += 1
        elif out.endswith(NOT_ASCII):
            self.counters.not_ascii += 1
        self._close_after_flush(conn)

    def _close_after_flush(self: Worker, conn: Conn) -> None:
        """Close once the answers owed are sent; until then nothing more is read."""
        conn.state = CLOSE_AFTER_FLUSH
        if not conn.out:
            self._close(conn)

    def _close(self: Worker, conn: Conn) -> None:
        """Close a connection without turning unread input into a reset.

        A connection we close on our own (error, idle, stop) may still carry
        unread bytes, and close() would then send RST, which can destroy the
        answers in flight.  So we shut down our side and keep reading until
        the client closes or LINGER_SECONDS pass, like nginx's lingering close.
        """
        if conn.state == CLOSE_AFTER_FLUSH and not conn.out:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
                conn.state = LINGERING
                conn.last = time.monotonic()
                self.epoll.modify(conn.fd, EPOLLIN)
                return
            except OSError:
                pass
        self._forget(conn)

    def _forget(self: Worker, conn: Conn) -> None:
        del self.conns[conn.fd]
        conn.sock.close()  # also leaves the epoll set
        if conn.client:
            self.gate.release(conn.client)
        if (not self.accepting and self.state == SERVING and len(self.conns) < self.cfg.max_connections
                and not self.accept_paused):
            self._start_accepting()

    def _expire(self: Worker, now: float) -> None:
        """Close idle connections and forget lingering ones that took too long."""
        idle_limit = now - self.cfg.idle_timeout
        linger_limit = now - LINGER_SECONDS
        for conn in list(self.conns.values()):
            if conn.state == LINGERING:
                if conn.last < linger_limit:
                    self._forget(conn)
            elif conn.last < idle_limit:
                self.counters.timeouts += 1
                if conn.out:  # it has not read its answers for that long: give up
                    self._forget(conn)
                else:
                    self._close_after_flush(conn)

    def _answer_received(self: Worker, conn: Conn) -> None:
        out = []
        while True:
            try:
                data = conn.sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError:
                self._forget(conn)
                return
            if not data:
                break
            answers, must_close = conn.session.feed(data)
            out.append(answers)
            if must_close:
                break
        conn.out += b"".join(out)
        conn.state = CLOSE_AFTER_FLUSH
        if conn.out:
            self.epoll.modify(conn.fd, EPOLLOUT)
            self._flush(conn)
        else:
            self._close(conn)
