"""The access log ([log] access): one line per closed connection, like nginx's access_log.

Off by default, and then it costs nothing: install() leaves the worker as it is.  On, each
worker opens the log itself (O_APPEND: the workers' lines never mix within a line) and
wraps a few of its methods:
- the acceptors make CountingSockets (a _socket.socket subclass), whose send counts bytes out
  and the answers sent (each answer, and each error line, holds exactly one "."): the one
  cost per answered read; bytes in are the kernel's count (TCP_INFO), asked once at the end
  (a UNIX socket's recv counts them instead); _adopt turns a handed-over socket into one, and
  notes when the connection came and what the kernel had counted in before;
- _forget, handed (a hand-off the other worker confirmed), _refuse (the access rules): write
  the line;
- _tick, _exit_code: flush.  Closed connections are kept as tuples, formatted and written in
  writes of at most BUFFER bytes (below PIPE_BUF: a pipe to journald keeps each write whole)
  every tick, or once MAX_HELD are waiting.
USR1 reopens the file (logs.REOPEN_HOOKS), like the error log.

A line says: time, client (a PROXY header's source when there is one), worker, generation,
duration (from when this worker took the connection), questions answered, bytes in and out
(PROXY headers not counted), and how it ended: client_close, idle, drain, handoff, refused
(with the cause), error (a protocol error or a socket error), stop (the worker stopped).
Connections refused before a PROXY header was complete are not logged here (they are counted
in `status`).
"""

from __future__ import annotations

import _socket
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from . import logs
from .logs import log
from .scoreboard import STOPPING
from .sockets import acceptor, describe

if TYPE_CHECKING:
    from .connections import Conn
    from .worker import Worker

TCP_INFO_SIZE, BYTES_RECEIVED = 136, 128  # struct tcp_info: tcpi_bytes_received (Linux 4.1)
TCP_CLOSE = 7  # a connection the peer reset is CLOSE at our end; one it ended with a FIN, CLOSE_WAIT
FIN_RECEIVED = (6, 8, 9, 11)  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING
BUFFER = 3584  # most bytes of lines in one write: below PIPE_BUF (4096), so a write stays whole
MAX_HELD = 256  # closed connections waiting for the next tick's flush
PEEK = socket.MSG_PEEK
_recv = _socket.socket.recv
_send = _socket.socket.send


class CountingSocket(_socket.socket):
    """A TCP connection's socket that counts what it sends; only ever made while the access log is on.

    send() counts bytes out and answers: the one Python call per answered read that the access
    log adds.  Bytes in are the kernel's count (received()), read once, at the end; its TCP
    state then also tells a reset from a FIN.  No __slots__: the class's zeros stand until a
    count is first set, so making one costs nothing more than a plain socket.
    """

    started = 0.0
    bytes_out = answers = errors = 0
    received_before = 0  # the kernel's count when this worker took it (handed over, or a PROXY header)
    ended = ""

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            sent = _send(self, data, flags)
        except BlockingIOError:
            raise
        except OSError:
            self.ended = self.ended or "error"
            raise
        self.bytes_out += sent
        self.answers += data.count(b".", 0, sent)
        return sent


class CountingUnixSocket(CountingSocket):
    """A UNIX socket's: no TCP_INFO to ask at the end, so recv() counts bytes in as they come."""

    bytes_in = 0

    def recv(self, size: int, flags: int = 0) -> bytes:
        try:
            data = _recv(self, size, flags)
        except BlockingIOError:
            raise
        except OSError:
            self.ended = self.ended or "error"
            raise
        if not flags & PEEK:
            self.bytes_in += len(data)
        return data


def tcp_info(sock: CountingSocket) -> tuple[int, int]:
    """(TCP state, bytes received) as the kernel counts them; (0, -1) if it cannot say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
        return info[0], struct.unpack_from("=Q", info, BYTES_RECEIVED)[0]
    except (OSError, struct.error):
        return 0, -1


def received(sock: CountingSocket) -> tuple[int, str]:
    """(bytes in while this worker had it, "error" if the peer reset it, else "")."""
    if type(sock) is CountingUnixSocket:
        return sock.bytes_in, ""
    state, count = tcp_info(sock)
    if count < 0:
        return -1, ""
    fin = state in FIN_RECEIVED  # the kernel counts the peer's FIN as a byte received
    return count - sock.received_before - fin, ("error" if state == TCP_CLOSE else "")


def counting(sock: Any) -> CountingSocket:
    """A handed-over socket as a CountingSocket on the same descriptor."""
    make = CountingUnixSocket if sock.family == socket.AF_UNIX else CountingSocket
    new = make(sock.family, socket.SOCK_STREAM, 0, sock.detach())
    new.setblocking(False)
    return new


def mark(conn: Conn, why: str, protocol_error: bool = False) -> None:
    """Say why the server closes `conn` (idle, drain, error), for its line; a no-op when off."""
    sock = conn.sock
    if isinstance(sock, CountingSocket) and not sock.ended:
        sock.ended = why
        sock.errors += protocol_error  # its error line is no answer


class AccessLog:
    """One worker's access log: a file (or stderr) and the lines not written yet."""

    def __init__(self, target: str, fmt: str, worker: int, generation: int) -> None:
        self.target, self.json = target, fmt == "json"
        self.worker, self.generation, self.pid = worker, generation, os.getpid()
        self.fd = self._open()
        self.held: list[tuple] = []  # (wall clock, peer, duration, questions, in, out, end, cause)
        self.second = -1
        self.stamp = ""
        self.failing = False  # a write failed: said once, until one succeeds
        # One %-format a line (the fastest Python has): time, client, then the counts.
        if self.json:
            self.template = (f'{{"time": "%s.%03dZ", "client": "%s", "worker": {worker}, "generation": '
                             f'{generation}, "pid": {self.pid}, "duration_s": %.6f, "questions": %d, '
                             '"bytes_in": %d, "bytes_out": %d, "end": "%s"%s}\n')
        else:
            self.template = (f"%s.%03dZ %s worker={worker} gen={generation} duration=%.6f questions=%d in=%d "
                             "out=%d end=%s%s\n")

    def _open(self) -> int:
        if self.target == "stderr":
            return 2
        return os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def reopen(self) -> None:
        """USR1 (logrotate): the lines so far to the old file, then a new one at the same path."""
        self.flush()
        try:
            fd = self._open()
        except OSError as e:
            log.error("cannot reopen access log %s: %s; still writing to the file already open",
                      self.target, e.strerror)
            return
        if self.fd != 2:
            os.close(self.fd)
        self.fd = fd

    def record(self, peer: object, duration: float, questions: int, bytes_in: int, bytes_out: int,
               end: str, cause: str = "") -> None:
        self.held.append((time.time(), peer, duration, questions, bytes_in, bytes_out, end, cause))
        if len(self.held) >= MAX_HELD:
            self.flush()

    def closed(self, conn: Conn, end: str, now: float) -> None:
        sock = conn.sock
        if isinstance(sock, CountingSocket):
            bytes_in, reset = received(sock)
            self.held.append((time.time(), conn.peer, now - sock.started, sock.answers - sock.errors,
                              bytes_in, sock.bytes_out, sock.ended or reset or end, ""))
            if len(self.held) >= MAX_HELD:
                self.flush()

    def _line(self, wall: float, peer: object, duration: float, questions: int, bytes_in: int,
              bytes_out: int, end: str, cause: str) -> str:
        second = int(wall)
        if second != self.second:  # strftime once a second, not once a line
            self.second, self.stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        if isinstance(peer, tuple) and len(peer) >= 2 and ":" not in peer[0]:
            client = f"{peer[0]}:{peer[1]}"  # IPv4, the common case, without a call
        else:
            client = describe(peer)
        if cause:
            cause = f', "cause": "{cause}"' if self.json else f" cause={cause}"
        return self.template % (self.stamp, (wall - second) * 1000, client, duration, max(0, questions),
                                bytes_in, bytes_out, end, cause)

    def flush(self) -> None:
        """Write what is held, in writes of at most BUFFER bytes (whole lines)."""
        if not self.held:
            return
        held, self.held = self.held, []
        chunk: list[bytes] = []
        size = 0
        for item in held:
            line = self._line(*item).encode("utf-8", "replace")
            if size + len(line) > BUFFER and chunk:
                self._write(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self.fd, data):]
            self.failing = False
        except OSError as e:  # a full disk must not stop the service: the lines are dropped
            if not self.failing:
                log.error("cannot write the access log %s: %s; lines are dropped until it works",
                          self.target, e.strerror)
            self.failing = True


def install(worker: Worker) -> AccessLog | None:
    """Set up the access log of a worker about to run (nothing when it is off)."""
    from .connections import FINISHING  # connections imports mark() from here

    logs.set_generation(worker.generation)
    cfg = worker.cfg
    if not cfg.access_log:
        return None
    try:
        access = AccessLog(cfg.access_log, cfg.log_format, worker.number, worker.generation)
    except OSError as e:
        log.error("cannot open the access log %s: %s; serving without it", cfg.access_log, e.strerror)
        return None
    logs.REOPEN_HOOKS.append(access.reopen)
    adopt, forget, handed, refuse = worker._adopt, worker._forget, worker.handed, worker._refuse
    tick, exit_code = worker._tick, worker._exit_code

    def adopt_counting(sock: Any, now: float, last: float | None = None, peer: tuple | None = None,
                       client: int = 0) -> Conn:
        handed = not isinstance(sock, CountingSocket)  # accepted ones are made so
        if handed:
            sock = counting(sock)
        if (handed or worker.proxied) and type(sock) is CountingSocket:
            sock.received_before = max(0, tcp_info(sock)[1])  # what came before: not this worker's
        sock.started = now
        return adopt(sock, now, last, peer, client)

    def forget_logged(conn: Conn) -> None:
        if conn.fd in worker.conns:  # once: _forget is the last word on a connection
            stopping = worker.state == STOPPING or conn.state == FINISHING
            access.closed(conn, "stop" if stopping else "client_close", time.monotonic())
        forget(conn)

    def handed_logged(conn: Conn) -> None:
        access.closed(conn, "handoff", time.monotonic())
        handed(conn)

    def refuse_logged(sock: Any, cause: str, addr: object) -> None:
        access.record(addr, 0.0, 0, 0, 0, "refused", cause)
        refuse(sock, cause, addr)

    def tick_flushing(now: float) -> int | None:
        access.flush()
        return tick(now)

    def exit_flushing() -> int:
        now = time.monotonic()
        for conn in list(worker.conns.values()):  # still open as the worker goes: they end with it
            access.closed(conn, "stop", now)
        code = exit_code()
        access.flush()
        return code

    worker.acceptors = {fd: acceptor(s, CountingUnixSocket if s.family == socket.AF_UNIX else CountingSocket)
                        for fd, s in worker.listeners.items()}
    worker._adopt = adopt_counting  # type: ignore[method-assign]
    worker._forget = forget_logged  # type: ignore[method-assign]
    worker.handed = handed_logged  # type: ignore[method-assign]
    worker._refuse = refuse_logged  # type: ignore[method-assign]
    worker._tick = tick_flushing  # type: ignore[method-assign]
    worker._exit_code = exit_flushing  # type: ignore[method-assign]
    return access
