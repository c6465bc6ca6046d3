"""Handing live connections from a retiring worker to a current one.

A retired worker (reload, TTOU, max_requests, USR2 upgrade) does not make
its clients wait for graceful_timeout and then disconnect them: at a
question boundary (its answers flushed) it sends each connection's socket
over SCM_RIGHTS, with the bytes of any unfinished question, to a worker of
the current generation, which carries on serving it.  The client sees
nothing, and from its next question on gets the new config's answers.

Every worker listens on an abstract-namespace SOCK_SEQPACKET socket named
after its PID (one message = one connection; no file to clean up).  Targets
come from the scoreboard file beside the PID file, which after a USR2
upgrade is the new master's: so the same code hands connections across an
upgrade.  Peers are checked with SO_PEERCRED: only our own user may hand us
a socket.
"""

from __future__ import annotations

import os
import socket
import struct

from .logs import log
from .scoreboard import SERVING, Scoreboard

MAX_MESSAGE = 65536  # a connection's unfinished question travels with it


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


def receive(channel: socket.socket) -> tuple[list[tuple[socket.socket, bytes]], bool]:
    """Connections waiting on a channel as (socket, unfinished question), and whether it closed."""
    received = []
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, 1)
        except BlockingIOError:
            return received, False
        except OSError:
            return received, True
        if not fds:
            return received, True  # EOF: the sender is done
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(False)
        received.append((sock, data))


class Sender:
    """The retiring side: picks targets and sends connections to them."""

    def __init__(self, board_path: str, own_board: Scoreboard, max_connections: int) -> None:
        self.board_path = board_path
        self.own_board = own_board
        self.max_connections = max_connections
        self.channels: dict[int, socket.socket] = {}
        self.sent: dict[int, int] = {}  # target pid -> connections sent, for a fair spread

    def targets(self) -> list[tuple[int, int]]:
        """(pid, load) of the current generation's serving workers, least loaded first."""
        board = self.own_board
        try:
            if self.board_path:  # after a USR2 upgrade this is the new master's board
                board = Scoreboard.open(self.board_path)
        except (OSError, ValueError):
            pass
        current = board.read_header().generation
        found = []
        for _, slot in board.slots():
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
            targets[index] = (pid, load + 1)
            targets.sort(key=lambda t: t[1])
            return True
        return False

    def _channel(self, pid: int) -> socket.socket | None:
        channel = self.channels.get(pid)
        if channel is None:
            channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                channel.connect(address(pid))
            except OSError:
                channel.close()
                return None
            channel.setblocking(False)
            self.channels[pid] = channel
        return channel

    def _drop(self, pid: int) -> None:
        channel = self.channels.pop(pid, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        for pid in list(self.channels):
            self._drop(pid)
