"""A worker's connections: adopting, writing, closing without a reset, expiring (docs/PROTOCOL.md).

A mixin of the Worker (worker.py), whose loop handles the hot path itself:
this is everything a connection needs besides one recv and one send.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import time
from typing import TYPE_CHECKING

from .logs import log
from .protocol import NOT_ASCII, TOO_LONG, AnswerTable, Session
from .scoreboard import DRAINING, SERVING, STOPPING
from .sockets import describe

if TYPE_CHECKING:
    from .worker import Worker

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
RECV_SIZE = 16384  # also the most unparsed input a connection holds back (Session.held)
# Fairness.  A read is answered at once up to READ_SLICE bytes (plenty for any
# client that waits for its answers); what more it asked for is answered a
# slice (SLICE_BYTES) per turn, after everyone else's questions, and the
# slices of one turn stop after TURN_BUDGET seconds, the rest next turn.
READ_SLICE = 4096
TURN_BUDGET = 0.010
LINGER_SECONDS = 2.0  # how long a closing connection may still send us bytes

# Connection states.  FINISHING: the worker stops; answer what the client sent, then close.
OPEN, CLOSE_AFTER_FLUSH, LINGERING, FINISHING = 0, 1, 2, 3  # OPEN stays 0: the hot path tests `conn.state`


class Conn(Session):
    """A connection: the protocol's Session (its unanswered input) with its socket and timers.

    One object per connection, not a Conn holding a Session: a connect-per-request client
    costs one allocation and one __init__ less.
    """

    __slots__ = ("sock", "fd", "out", "last", "state", "writing", "unsent", "looked", "client", "peer",
                 "started", "answers", "bytes_in", "bytes_out", "ended")

    def __init__(self, sock: socket.socket, table: AnswerTable, now: float,
                 peer: tuple | None = None) -> None:
        self.table = table  # Session's three, set here: no second __init__ call
        self.pending = b""
        self.held = False
        self.sock = sock
        self.fd = sock.fileno()
        self.out = b""  # answers the kernel has not taken yet (at most one slice)
        self.last = now  # the last progress: a complete question, answers taken (or accept)
        self.state = OPEN
        self.writing = False  # watched for EPOLLOUT: output owed, input held back, or finishing
        self.unsent = -1  # bytes in the kernel's send queue when _taking_answers last looked
        self.looked = now  # .last when it looked: if .last moved since, that look is stale
        self.client = 0  # its fingerprint in the per-client counts (access.py), 0 = not counted
        self.peer = peer  # the client's address: the socket's peer, or a PROXY header's source
        # The access log's (connlog.py), counted only while it is on: set here, in the one __init__,
        # because a subclass's own __init__ cost more per connection than these five stores.
        self.started = now  # when this worker took it
        self.answers = self.bytes_in = self.bytes_out = 0  # bytes out: queued (conn.out: not sent yet)
        self.ended = ""  # the server's own reason to close it, for its line (mark)


def mark(conn: Conn, why: str, protocol_error: bool = False) -> None:
    """Say why the server closes `conn` (idle, drain, error), for its access-log line (the first
    reason stands; read only while the access log is on)."""
    if not conn.ended:
        conn.ended = why
        conn.answers -= protocol_error  # its error line is no answer


class Connections:
    """Per-connection mechanics of the Worker."""

    def _adopt(self: Worker, sock: socket.socket, now: float, last: float | None = None,
               peer: tuple | None = None, client: int = 0) -> Conn:
        """Serve a connection accepted here or handed over; `last` keeps its idle timer (a hand-off),
        `client` is its count in the per-client limit.

        Raises OSError when epoll cannot watch it (ENOMEM; ENOSPC: fs.epoll.max_user_watches):
        then the socket is closed and uncounted, and the caller decides the rest (an accept
        pauses, as it does out of descriptors).
        """
        try:
            self.epoll.register(sock.fileno(), EPOLLIN)
        except OSError:
            if client:
                self.gate.release(client)
            sock.close()
            raise
        conn = Conn(sock, self.table, now, peer)
        conn.client = client
        self.recent.append(peer)
        if last is not None:
            conn.last = min(last, now)
        self.conns[conn.fd] = conn
        return conn

    def _full(self: Worker) -> bool:
        return len(self.conns) + len(self.awaiting) >= self.cfg.max_connections  # awaiting: proxied.py

    def _want_output(self: Worker, conn: Conn) -> None:
        """Stop reading from the client; wake when its socket can take more."""
        if not conn.writing:
            conn.writing = True
            self.epoll.modify(conn.fd, EPOLLOUT)

    def _want_input(self: Worker, conn: Conn) -> None:
        if conn.writing:
            conn.writing = False
            self.epoll.modify(conn.fd, EPOLLIN)

    def _serve_writable(self: Worker, writable: list[Conn], now: float) -> None:
        """Those epoll found writable, in turn, for TURN_BUDGET at most.

        The others are reported again at the next poll, in the same order:
        the turn after starts where this one stopped.
        """
        conns = self.conns
        count = len(writable)
        first = self.rotation % count
        deadline = time.monotonic() + TURN_BUDGET
        for i in range(first, first + count):
            conn = writable[i % count]
            if conns.get(conn.fd) is conn:  # not closed meanwhile
                self._writable(conn, now)
            if time.monotonic() > deadline:
                self.rotation = i + 1
                return

    def _writable(self: Worker, conn: Conn, now: float) -> None:
        """EPOLLOUT: send what is owed; then answer the next slice of what is held back.

        One slice per connection per turn of the loop, so a client with a
        large backlog (a flood of '?', a long answer asked again and again)
        gets its share and leaves the others theirs.
        """
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except BlockingIOError:
                return
            except OSError:
                self._broken(conn)
                return
            if sent:
                conn.last = now  # it reads its answers: progress
            conn.out = conn.out[sent:]
            if conn.out:
                return
        if conn.state == CLOSE_AFTER_FLUSH:
            self._close(conn)
        elif conn.held or conn.state == FINISHING:
            self._next_slice(conn, now)
        else:
            self._want_input(conn)
            if self.state == DRAINING:
                self._hand_off()  # its answers are out: now it can go

    def _answer_read(self: Worker, conn: Conn, data: bytes, now: float) -> None:
        """A read the loop's hot path does not answer itself: a lingering connection's, the rest of
        an unfinished question, pipelined or unknown questions, an error, any read while the
        access log counts."""
        if conn.state == LINGERING:
            return  # closing: what it still sends is read and dropped
        self.bytes_in += len(data)
        if self.access is not None:
            conn.bytes_in += len(data)
        out, must_close = conn.feed(data, READ_SLICE)  # Conn is the protocol's Session
        if not out:  # an unfinished question (an error always has its line)
            return
        self.answered += out.count(b".") - must_close  # an error line is no answer
        conn.last = now
        if not self._send(conn, out):
            return
        if conn.out or conn.held:  # back-pressure, or a full slice: the rest of the input waits
            self._want_output(conn)
        if must_close:
            self._protocol_error(conn, out)

    def _send(self: Worker, conn: Conn, out: bytes) -> bool:
        """Send answers; what the kernel does not take waits in conn.out.  False: the connection failed
        (closed).  The loop's hot path does the same inline."""
        self.bytes_out += len(out)
        if self.access is not None:  # the access log's counts (connlog.py)
            conn.answers += out.count(b".")
            conn.bytes_out += len(out)
        try:
            sent = conn.sock.send(out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._broken(conn)
            return False
        conn.out = out[sent:]
        return True

    def _next_slice(self: Worker, conn: Conn, now: float) -> None:
        session = conn  # its protocol state
        if session.held:
            out, must_close = session.resume()
        else:  # FINISHING: the next piece of what the client sent before the stop
            try:
                data = conn.sock.recv(RECV_SIZE)
            except BlockingIOError:
                data = b""
            except OSError:
                mark(conn, "error")
                self._forget(conn)
                return
            if not data:  # everything received is answered
                self._close_after_flush(conn)
                return
            self.bytes_in += len(data)
            if self.access is not None:
                conn.bytes_in += len(data)
            out, must_close = session.feed(data)
        if out:
            conn.last = now
            self.answered += out.count(b".") - must_close
            if not self._send(conn, out):
                return
        if must_close:
            self._protocol_error(conn, out)
        elif conn.out or session.held or conn.state == FINISHING:
            self._want_output(conn)  # the rest next turn
        else:
            self._want_input(conn)
            if self.state == DRAINING:  # every answer is out: for a client that pipelines without
                self._hand_off()  # pause this instant may be its only question boundary

    def _protocol_error(self: Worker, conn: Conn, out: bytes) -> None:
        if out.endswith(TOO_LONG):
            self.counters.too_long += 1
        elif out.endswith(NOT_ASCII):
            self.counters.not_ascii += 1
        log.debug("closing %s: %s", describe(conn.peer), out[out.rfind(b"Error"):].decode())
        mark(conn, "error", protocol_error=True)
        self._close_after_flush(conn)

    def _close_after_flush(self: Worker, conn: Conn) -> None:
        """Close once the answers owed are sent; until then nothing more is read."""
        conn.state = CLOSE_AFTER_FLUSH
        if conn.out:
            self._want_output(conn)
        else:
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
                self._want_input(conn)
                return
            except OSError:
                pass
        self._forget(conn)

    def _broken(self: Worker, conn: Conn) -> None:
        """A send or recv failed (a reset, most often): close it, and say so in its access-log line."""
        mark(conn, "error")
        self._close(conn)

    def _may_resume_accepting(self: Worker) -> bool:
        """After a close: accept again, unless retired, stopping, full, paused or yielding (spread.py)."""
        return (not self.accepting and self.state == SERVING and not self._full()
                and not self.accept_paused and self.yielding is None)

    def _forget(self: Worker, conn: Conn) -> None:
        del self.conns[conn.fd]
        conn.sock.close()  # also leaves the epoll set
        if self.access is not None:  # its line: the worker stops with it open, or the client closed it
            self.access.closed(conn, "stop" if self.state == STOPPING or conn.state == FINISHING
                               else "client_close")
        if conn.client:
            self.gate.release(conn.client)
        if not self.accepting and self._may_resume_accepting():  # accepting: the common case, no call
            self._start_accepting()

    def _expire(self: Worker, now: float) -> None:
        """Close idle connections and forget lingering ones that took too long.

        Idle means no progress either way: no complete question, and no
        answers taken.  A client still reading a large backlog is not idle.
        """
        idle_limit = now - self.cfg.idle_timeout
        linger_limit = now - LINGER_SECONDS
        for conn in list(self.conns.values()):
            if conn.state == LINGERING:
                if conn.last < linger_limit:
                    self._forget(conn)
                continue
            if conn.last < idle_limit and not self._taking_answers(conn, now):
                self.counters.timeouts += 1
                mark(conn, "idle")  # for the access log
                if conn.out:  # it has not read its answers for that long: give up
                    self._forget(conn)
                else:
                    self._close_after_flush(conn)

    def _taking_answers(self: Worker, conn: Conn, now: float) -> bool:
        """An idle-looking client that still reads answers queued in the kernel is not idle.

        The loop sees that progress only when the send queue has room for more;
        a client reading a large backlog slowly drains it long before.  So a
        connection due to expire with answers still queued gets one more tick,
        and is kept if the queue shrinks meanwhile (or since the last look).
        A look from before progress the loop saw (the queue refilled, say) is
        no yardstick: the queue may have grown since.  That counts as a first
        look too.
        """
        seen, conn.unsent = conn.unsent, _unsent(conn)
        stale = conn.looked != conn.last
        conn.looked = conn.last
        if conn.unsent and (seen < 0 or stale):
            return True  # first look: judge at the next tick
        if conn.unsent < seen:
            conn.last = conn.looked = now
            return True
        return False

    def _answer_received(self: Worker, conn: Conn) -> None:
        """Stopping: answer what the client sent, a slice per turn of the loop, then close."""
        conn.state = FINISHING
        self._want_output(conn)


def _unsent(conn: Conn) -> int:
    """Bytes in the kernel's send queue of the connection, not yet taken by the client."""
    try:
        return struct.unpack("i", fcntl.ioctl(conn.fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0
