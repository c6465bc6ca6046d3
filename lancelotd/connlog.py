"""The access log ([log] access): one line per closed connection, like nginx's access_log.

Off by default: then the loop pays one test of a local flag per answered read (and a Conn five
slot stores at its start).  On, install() gives the worker an AccessLog, and the loop keeps each
Conn's counts as it answers (bytes in and out, answers: no extra system call).  A connection's
values are held as a tuple when it ends (_forget, a confirmed hand-off, a refusal), and the
held ones formatted in one pass at the next tick (or once MAX_HELD wait), in writes of at
most BUFFER bytes (below PIPE_BUF: a pipe to journald keeps each write whole).
Each worker opens the file itself with O_APPEND, so the workers' lines never mix within a line.
USR1 reopens it (logs.REOPEN_HOOKS).

A line says: time (when it ended, to the millisecond), client (a PROXY header's source
when there is one), worker, generation, duration (from when this worker took the connection),
questions answered, bytes in and out (PROXY headers not counted), and how it ended:
client_close, idle, drain, handoff, refused (with the cause), error (a protocol error, a
socket error or a reset), stop (the worker stopped).  Connections refused before a PROXY
header was complete are not logged here (they are counted in `status`).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from . import logs
from .connections import Conn
from .logs import log
from .sockets import describe

if TYPE_CHECKING:
    from .worker import Worker

BUFFER = 3584  # most bytes of lines in one write: below PIPE_BUF (4096), so a write stays whole
MAX_HELD = 256  # closed connections waiting for the next tick's flush


class AccessLog:
    """One worker's access log: a file (or stderr) and the lines not written yet."""

    def __init__(self, target: str, fmt: str, worker: int, generation: int) -> None:
        self.target, self.json = target, fmt == "json"
        self.fd = self._open()
        self.held: list[tuple] = []  # (peer, started, ended, questions, bytes in, out, end, cause)
        self.second, self.stamps = -1, {}  # the time to the second, by second (_stamps)
        self.failing = False  # a write failed: said once, until one succeeds
        # The line: time, client, then the counts (formatted in flush).
        if self.json:
            self.template = (f'{{"time": "%s.%03dZ", "client": "%s", "worker": {worker}, "generation": '
                             f'{generation}, "pid": {os.getpid()}, "duration_s": %.6f, "questions": %d, '
                             '"bytes_in": %d, "bytes_out": %d, "end": "%s"%s}\n')
            self.cause = ', "cause": "%s"'
        else:
            self.template = (f"%s.%03dZ %s worker={worker} gen={generation} duration=%.6f questions=%d in=%d "
                             "out=%d end=%s%s\n")
            self.cause = " cause=%s"

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
        """A connection this worker never served (a refusal): its line, with the cause."""
        now = time.monotonic()
        self.held.append((peer, now - duration, now, questions, bytes_in, bytes_out, end, cause))
        if len(self.held) >= MAX_HELD:
            self.flush()

    def closed(self, conn: Conn, end: str) -> None:
        """`conn` ends (`end` unless the server marked a reason of its own); what the kernel
        never took (conn.out) was not sent.  Only its values and the monotonic clock (the
        cheapest) are kept here: the line is formatted at the next tick (flush)."""
        unsent = len(conn.out)
        self.held.append((conn.peer, conn.started, time.monotonic(), conn.answers, conn.bytes_in,
                          conn.bytes_out - unsent, conn.ended or end, ""))
        if len(self.held) >= MAX_HELD:
            self.flush()

    def flush(self) -> None:
        """Format what is held and write it in writes of at most BUFFER bytes, each of whole
        lines."""
        if not self.held:
            return
        held, self.held = self.held, []
        to_wall = time.time() - time.monotonic()  # the monotonic ends as wall-clock times
        stamps = self._stamps(int(held[0][2] + to_wall), int(held[-1][2] + to_wall))
        line, because = self.template, self.cause
        # One comprehension, one %-format a line: the least Python per line (an IPv4 peer is a
        # 2-tuple, the common case; describe() names the others).
        text = "".join([line % (stamps[int(wall)], wall % 1 * 1000, f"{peer[0]}:{peer[1]}"
                                if type(peer) is tuple and len(peer) == 2 else describe(peer),
                                ended - started, max(0, asked), b_in, b_out, end, cause and because % cause)
                        for peer, started, ended, asked, b_in, b_out, end, cause in held
                        for wall in (ended + to_wall,)])
        data = text.encode("utf-8", "replace")
        start = 0
        while len(data) - start > BUFFER:
            end = data.rfind(b"\n", start, start + BUFFER) + 1
            if end <= start:  # one line longer than BUFFER: alone, whole
                end = data.index(b"\n", start) + 1
            self._write(data[start:end])
            start = end
        self._write(data[start:])

    def _stamps(self, first: int, last: int) -> dict[int, str]:
        """The time to the second of each second from `first` to `last` (most often one, the
        same as the last flush's: strftime once a second, not once a line)."""
        if first != self.second or last != first:
            self.second = first if last == first else -1
            self.stamps = {second: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                           for second in range(first, max(first, last) + 1)}
        return self.stamps

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


def install(worker: Worker) -> None:
    """Set up the access log of a worker about to run (nothing when it is off)."""
    logs.set_generation(worker.generation)
    cfg = worker.cfg
    if not cfg.access_log:
        return
    try:
        access = AccessLog(cfg.access_log, cfg.log_format, worker.number, worker.generation)
    except OSError as e:
        log.error("cannot open the access log %s: %s; serving without it", cfg.access_log, e.strerror)
        return
    logs.REOPEN_HOOKS.append(access.reopen)
    worker.access = access
