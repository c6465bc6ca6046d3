"""Behind a load balancer, the pieces without the master: the drain file and the agent port.

The drain file is the operator's "send me no more": `lancelotd drain` creates it, `undrain`
removes it, and the master looks for it on every loop turn (one stat()), so it survives
restarts and USR2 and needs no signal of its own.

The agent port speaks HAProxy's agent-check protocol: on connect it answers one line and
closes.  The master serves it from its select() loop, like the metrics port: non-blocking,
bounded in connections and time, never in a worker.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from . import runtime, trust
from .config import Config
from .logs import log
from .sockets import bind, format_address

# What the agent says, from the master's state (balancer.Balancing.balance_state).
READY, DRAINED, STOPPING, NOT_SERVING = range(4)
BALANCE_NAMES = {READY: "ready", DRAINED: "drained", STOPPING: "stopping", NOT_SERVING: "not_serving"}
# Never "down", "stopped", "fail" or "maint" for a planned drain: HAProxy would mark the server
# DOWN (and `on-marked-down shutdown-sessions` cut every session) or stop checking it.
AGENT_READY = b"ready 100%\n"
AGENT_DRAIN = b"drain\n"

AGENT_CLIENTS = 64  # answered connections waiting for the peer's close; the oldest goes first
AGENT_LINGER = 1.0  # seconds we read (and drop) what a peer sends after our line, so close() sends no RST
ACCEPTS_PER_TURN = 16


def drain_file(cfg: Config) -> str:
    """The drain file: the configured one, else beside the PID file; "" when there is neither."""
    if cfg.drain_file:
        return cfg.drain_file
    return cfg.pid_file + ".drain" if cfg.pid_file else ""


def is_drained(path: str) -> bool:
    """Does the drain file exist, and count?  OSError (other than "no such file") goes to the caller.

    It counts only as a regular file owned by root or by us, in a directory
    that passes the runtime directory's rules (trust.py) and is root's or
    ours: in a shared directory anyone could drain the host (trust.Untrusted).
    """
    if not path:
        return False
    owners = runtime.owners()  # root, us, and a root master's workers' user (privileges.py)
    try:
        with trust.open_directory(os.path.dirname(os.path.abspath(path)), owners) as directory:
            return directory.stat(os.path.basename(path), owners) is not None
    except (FileNotFoundError, NotADirectoryError):
        return False


def set_drained(path: str, drained: bool) -> bool:
    """Create (atomically, with when and who) or remove the drain file; True if it changed.

    Run as root in a directory the service user owns, so through trust.py: the
    directory must pass the rules, the file is made fresh (O_EXCL|O_NOFOLLOW,
    fchmod) and renamed over the name, which replaces a planted link rather
    than writing through it.  A missing directory is created (runtime.py),
    0755: a root-owned place the service can read is where the drain state is
    best kept under systemd.  OSError (trust.Untrusted says what it refused).
    """
    where, name = os.path.split(os.path.abspath(path))
    try:
        directory = trust.open_directory(where)
    except FileNotFoundError:
        if not drained:
            return False
        runtime.ensure_directory(where, 0o755)  # the service (another user) must read the file
        directory = trust.open_directory(where)
    with directory:
        if not drained:
            return directory.unlink(name)
        try:
            was = directory.stat(name) is not None
        except trust.Untrusted:  # a link or a stranger's file at the name: replaced below
            was = False
        stamp = f"drained at {time.strftime('%Y-%m-%dT%H:%M:%S%z')} by uid {os.getuid()}\n"
        directory.replace(name, stamp.encode(), 0o644)  # the master may run as another user: it reads it
        return not was


class AgentServer:
    """HAProxy agent-check: one line per connection, then a lingering close."""

    def __init__(self, address: str, answer: Callable[[], bytes]) -> None:
        self.address = address
        self.answer = answer
        self.listener = bind(address, 64)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.closing: dict[int, tuple[socket.socket, float]] = {}  # insertion order = age
        log.info("agent-check on %s", format_address(self.listener.getsockname()))

    def fds(self) -> list[int]:
        return [self.listener.fileno(), *self.closing]

    def handle(self, readable: list[int]) -> None:
        now = time.monotonic()
        if self.listener.fileno() in readable:
            self._accept(now)
        for fd in readable:
            if fd in self.closing:
                self._read(fd)
        for fd, (_, deadline) in list(self.closing.items()):
            if now > deadline:
                self._drop(fd)

    def _accept(self, now: float) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the next turn tries again
                log.warning("agent: accept failed: %s", e.strerror)
                return
            try:
                sock.setblocking(False)
                sock.send(self.answer())  # a fresh socket's buffer takes a dozen bytes at once
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # the peer is gone already
                sock.close()
                continue
            if len(self.closing) >= AGENT_CLIENTS:
                self._drop(next(iter(self.closing)))
            self.closing[sock.fileno()] = (sock, now + AGENT_LINGER)

    def _read(self, fd: int) -> None:
        sock, _ = self.closing[fd]
        try:
            if sock.recv(4096):
                return  # dropped; wait for its close
        except BlockingIOError:
            return
        except OSError:
            pass
        self._drop(fd)

    def _drop(self, fd: int) -> None:
        sock, _ = self.closing.pop(fd)
        sock.close()

    def close(self) -> None:
        for fd in list(self.closing):
            self._drop(fd)
        self.listener.close()
