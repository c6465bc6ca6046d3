"""Handing live connections from a retiring worker to a current one.

A retired worker (reload, TTOU, max_requests, USR2 upgrade) does not make
its clients wait for graceful_timeout and then disconnect them: at a
question boundary (its answers flushed) it sends each connection's socket
over SCM_RIGHTS, with the bytes of any unfinished question, to a worker of
the current generation, which carries on serving it.  The client sees
nothing, and from its next question on gets the new config's answers.

Every worker listens on an abstract-namespace SOCK_SEQPACKET socket named
after its PID (one message = one connection; no file to clean up).  The
receiver answers every connection on the same channel: an ACK, or - when it
is at its own max_connections - the connection itself, sent back, which the
sender then keeps serving (the scoreboard a sender chooses by is up to a
second old, and two workers may retire at once).  A sender leaves only once
every connection it sent has been answered for.  Targets
come from the scoreboard file beside the PID file, which after a USR2
upgrade is the new master's: so the same code hands connections across an
upgrade.  Peers are checked with SO_PEERCRED: only our own user may hand us
a socket.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable

from .logs import log
from .scoreboard import SERVING, Scoreboard

MAX_MESSAGE = 65536  # a connection's unfinished question travels with it
FULL_FOR = 5.0  # seconds a target that sent a connection back is left alone
ACK = b"+"  # "adopted"; never empty: an empty SEQPACKET message reads like EOF
ANSWER_WITHIN = 2.0  # seconds a sender waits for a target's answer before it gives up


def address(pid: int) -> str:
    return f"\0lancelotd-handoff-{pid}"


def listen() -> socket.socket:
    """This worker's hand-off inbox."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    sock.bind(address(os.getpid()))
    sock.listen(64)
    return sock


def accept_channel(inbox: socket.socket) -> socket.socket | None:
    """A retiring worker's channel to us, if it runs as our user."""
    try:
        channel, _ = inbox.accept()
    except BlockingIOError:
        return None
    _pid, uid, _gid = struct.unpack("3i", channel.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid != os.getuid():
        log.warning("hand-off from uid %d refused", uid)
        channel.close()
        return None
    channel.setblocking(False)
    return channel


def receive(channel: socket.socket) -> tuple[list[tuple[socket.socket, bytes]], int, bool]:
    """What waits on a channel: connections as (socket, unfinished question), ACKs, and EOF."""
    received = []
    acks = 0
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, 1)
        except BlockingIOError:
            return received, acks, False
        except OSError:
            return received, acks, True
        if fds:
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            received.append((sock, data))
        elif data == ACK:
            acks += 1
        else:
            return received, acks, True  # EOF: the other side is gone


def acknowledge(channel: socket.socket) -> None:
    try:
        channel.send(ACK)
    except OSError:
        pass  # the sender is gone: it no longer waits


def send_back(channel: socket.socket, sock: socket.socket, pending: bytes) -> bool:
    """Return a connection to the worker that sent it (we are full); True if it went."""
    try:
        socket.send_fds(channel, [pending], [sock.fileno()])
    except OSError:
        return False
    sock.close()
    return True


class Sender:
    """The retiring side: picks targets and sends connections to them.

    `watch` is called with each new channel: connections a full target sends
    back arrive on it, and the worker adopts them again.
    """

    def __init__(self, board_path: str, own_board: Scoreboard, max_connections: int,
                 watch: Callable[[socket.socket], None]) -> None:
        self.board_path = board_path
        self.own_board = own_board
        self.max_connections = max_connections  # ours: a hint only, the target's own limit rules
        self.watch = watch
        self.channels: dict[int, socket.socket] = {}  # target pid -> channel
        self.sent: dict[int, int] = {}  # target pid -> connections sent, for a fair spread
        self.full_until: dict[int, float] = {}  # target pid -> when to try it again
        self.unanswered: dict[int, int] = {}  # target pid -> connections sent, not yet answered for
        self.last_sent = 0.0
        self.last_channel = -1  # the channel (fd) the last connection went out on

    def targets(self) -> list[tuple[int, int]]:
        """(pid, load) of the current generation's serving workers, least loaded first."""
        board = self.own_board
        try:
            if self.board_path:  # after a USR2 upgrade this is the new master's board
                board = Scoreboard.open(self.board_path)
        except (OSError, ValueError):
            pass
        current = board.read_header().generation
        now = time.monotonic()
        found = []
        for _, slot in board.slots():
            if self.full_until.get(slot.pid, 0.0) > now:
                continue
            if slot.generation == current and slot.state == SERVING and slot.pid != os.getpid():
                load = slot.connections + self.sent.get(slot.pid, 0)
                if load < self.max_connections:
                    found.append((load, slot.pid))
        if board is not self.own_board:
            board.close()
        return [(pid, load) for load, pid in sorted(found)]

    def send(self, conn_sock: socket.socket, pending: bytes, targets: list[tuple[int, int]]) -> bool:
        """Hand one connection to the least loaded target; False if none would take it."""
        if len(pending) > MAX_MESSAGE:
            return False
        for index, (pid, load) in enumerate(targets):
            channel = self._channel(pid)
            if channel is None:
                continue
            try:
                socket.send_fds(channel, [pending], [conn_sock.fileno()])
            except OSError:  # full, or the target went away: try the next one
                self._drop(pid)
                continue
            self.sent[pid] = self.sent.get(pid, 0) + 1
            self.unanswered[pid] = self.unanswered.get(pid, 0) + 1
            self.last_sent = time.monotonic()
            self.last_channel = channel.fileno()
            if load + 1 >= self.max_connections:
                del targets[index]  # full as far as we know
            else:
                targets[index] = (pid, load + 1)
                targets.sort(key=lambda t: t[1])
            return True
        return False

    def answered(self, channel_fd: int, acks: int, returned: int) -> None:
        """A target's answers: `acks` adopted, `returned` sent back (it is full: leave it a while)."""
        pid = self._pid_of(channel_fd)
        if pid is None:
            return
        self.unanswered[pid] = max(0, self.unanswered.get(pid, 0) - acks - returned)
        if returned:
            self.full_until[pid] = time.monotonic() + FULL_FOR
            self.sent[pid] = max(0, self.sent.get(pid, 0) - returned)

    def waiting(self) -> bool:
        """Connections sent whose fate the targets have not told yet (for ANSWER_WITHIN)."""
        return any(self.unanswered.values()) and time.monotonic() - self.last_sent < ANSWER_WITHIN

    def channel(self, channel_fd: int) -> socket.socket | None:
        pid = self._pid_of(channel_fd)
        return None if pid is None else self.channels[pid]

    def forget(self, channel_fd: int) -> None:
        """The target closed its end (it exited): drop the channel."""
        pid = self._pid_of(channel_fd)
        if pid is not None:
            self.unanswered.pop(pid, None)
            self._drop(pid)

    def _pid_of(self, channel_fd: int) -> int | None:
        for pid, channel in self.channels.items():
            if channel.fileno() == channel_fd:
                return pid
        return None

    def _channel(self, pid: int) -> socket.socket | None:
        channel = self.channels.get(pid)
        if channel is None:
            # Non-blocking from the start: a target whose inbox queue is full
            # answers EAGAIN instead of stalling this worker's loop.
            channel = socket.socket(socket.AF_UNIX,
                                    socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                channel.connect(address(pid))
            except OSError:
                channel.close()
                return None
            self.channels[pid] = channel
            self.watch(channel)
        return channel

    def _drop(self, pid: int) -> None:
        channel = self.channels.pop(pid, None)
        if channel is not None:
            channel.close()
