"""Where retiring workers find current ones (each worker's hand-off inbox), and what they say.

An inbox is a SOCK_SEQPACKET socket named PIDFILE.handoff-PID in the PID
file's directory, which is ours alone (runtime.py: 0700, or 0750 for root;
the socket itself is 0600).  Nobody else can bind a name there before us, nor
connect to ours.  Not an abstract name: any local user could bind that first
(every new worker would then fail at boot) or receive client sockets on it.
Not socketpairs brokered by the master either: after a USR2 upgrade the old
master's workers hand their connections to the new master's, and no master
knows the other's workers.

A stale socket of a dead worker that had our PID is replaced (the directory is
ours: only we can have left it); ours is removed when we stop receiving.
Without a PID file (--pid-file '') the inboxes live in the default runtime
directory, checked and made here as the master does for the PID file's; if
that cannot be had, there is no inbox and retiring workers drain instead.

Both ends check the other with SO_PEERCRED: the sender that the inbox belongs
to the very worker it chose from the scoreboard (pid) and to our user, the
receiver that the sender runs as our user.

The wire format (HAND, ANSWER and the reasons for a refusal) and a channel's
state are here too; handoff.py decides what to send.  See docs/DESIGN.md.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import deque
from typing import Protocol

from . import runtime
from .config import default_pid_file

MAX_PENDING = 65536  # an unfinished question travels with its connection (max_question_bytes <= 65536)
# b"V", the format's version, id, deadline, the connection's last progress (its idle timer:
# CLOCK_MONOTONIC is one clock for every process of the host), the client's address
# (sockets.pack_address: from a PROXY header, it is not the socket's peer); then the unfinished
# question; the socket as SCM_RIGHTS.  Across a USR2 upgrade the two ends may be two releases: a
# message of another version (or the unversioned b"H" of releases before 1) is refused with
# MALFORMED by its id, which every version keeps right after the kind (and version) byte, so its
# sender serves the connection again at once.
HAND = struct.Struct("=cBIddB16sH")
VERSION = 1
ANSWER = struct.Struct("=cIc")  # b"A" (adopted) or b"R" (refused), id, reason
HANDED, ADOPTED, REFUSED = b"V", b"A", b"R"
UNVERSIONED = b"H"  # the hand message of releases before VERSION 1: id at offset 1
IDENT = struct.Struct("=I")
FULL, LEAVING, LATE, NO_FD, MALFORMED = b"F", b"L", b"T", b"D", b"X"  # why a receiver refuses
REASONS = {FULL: "full", LEAVING: "not serving", LATE: "too late", NO_FD: "out of descriptors",
           MALFORMED: "malformed message"}
RECEIVE_SIZE = HAND.size + MAX_PENDING
FDS_SPACE = socket.CMSG_SPACE(2 * 4)  # room for one descriptor too many: that one is refused
SUN_PATH_MAX = 107  # bytes of a socket's path, its NUL aside
CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid
BACKLOG = 64
SEQPACKET = socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


def remove_inbox(pid_file: str, pid: int) -> None:
    """The master, after reaping worker `pid`: a worker killed by a signal left its inbox's name.

    Safe against reuse: the PID is free only from the reap on, and the master forks no worker
    between the reap and this.
    """
    try:
        os.unlink(f"{os.path.abspath(pid_file or default_pid_file())}.handoff-{pid}")
    except OSError:
        pass


class Rendezvous:
    """This worker's inbox, and the way to any other worker's."""

    def __init__(self, pid_file: str) -> None:
        self.pid = os.getpid()
        self.uid = os.geteuid()
        self.pid_file = os.path.abspath(pid_file or default_pid_file())
        self.checked = bool(pid_file)  # the master made sure of the PID file's directory at start
        self.dir_fd = -1
        self.inode = 0  # our inbox's, while it is bound

    def path(self, pid: int) -> str:
        """The inbox of worker `pid`; a path too long for sun_path goes through /proc/self/fd."""
        path = f"{self.pid_file}.handoff-{pid}"
        if len(os.fsencode(path)) <= SUN_PATH_MAX:
            return path
        if self.dir_fd < 0:
            self.dir_fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self.dir_fd}/{os.path.basename(path)}"

    def listen(self) -> socket.socket:
        """Our inbox, bound and listening; OSError (with the reason) if it cannot be had."""
        if not self.checked:
            runtime.ensure_directory(os.path.dirname(self.pid_file))
            self.checked = True
        path = self.path(self.pid)
        try:
            os.unlink(path)  # a dead worker's, with our PID: only we could have left it
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, SEQPACKET)
        umask = os.umask(0o177)  # srw-------: connecting takes write permission
        try:
            sock.bind(path)
            sock.listen(BACKLOG)
            self.inode = os.stat(path).st_ino
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(umask)
        return sock

    def remove(self) -> None:
        """Remove our inbox's name, if it is still ours."""
        if not self.inode:
            return
        path = self.path(self.pid)
        try:
            if os.stat(path).st_ino == self.inode:
                os.unlink(path)
        except OSError:
            pass
        self.inode = 0

    def connect(self, pid: int) -> socket.socket:
        """A channel to worker `pid`'s inbox, once its credentials say it is that worker, as our user.

        BlockingIOError: its queue is full; PermissionError: someone else's
        socket; other OSErrors: it is not receiving (any more).
        """
        sock = socket.socket(socket.AF_UNIX, SEQPACKET)
        try:
            sock.connect(self.path(pid))
            peer_pid, uid = self.peer(sock)
        except OSError:
            sock.close()
            raise
        if peer_pid != pid or uid != self.uid:
            sock.close()
            raise PermissionError(errno.EPERM, f"its inbox belongs to pid {peer_pid}, uid {uid}")
        return sock

    @staticmethod
    def peer(sock: socket.socket) -> tuple[int, int]:
        """(pid, uid) of the process at the other end, as the kernel recorded them."""
        pid, uid, _gid = CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDS.size))
        return pid, uid


class Held(Protocol):
    """A worker's connection, as far as the hand-off is concerned (connections.Conn)."""

    sock: socket.socket
    fd: int
    pending: bytes  # its unfinished question (connections.Conn is a protocol Session)
    last: float  # its last progress: the idle timer travels with it
    peer: tuple | None  # the client's address (a PROXY header's source), None: the socket's peer


class Channel:
    """One end of a hand-off channel: to a target (outbound) or from a sender (inbound)."""

    def __init__(self, sock: socket.socket, peer: int, outbound: bool) -> None:
        self.sock, self.peer, self.outbound = sock, peer, outbound
        self.fd = sock.fileno()
        self.flights: dict[int, tuple[Held, float]] = {}  # outbound: id -> (connection, deadline)
        # inbound: answers not sent yet, each with the copy of a refused connection, its question
        # and address, kept until the refusal is out: if the sender is gone, we are the last holder.
        self.outbox: deque[tuple[bytes, socket.socket | None, bytes, tuple | None]] = deque()
        self.watching_out = False


def fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4])
    return fds


def socket_of(fd: int) -> socket.socket | None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket: nothing we could serve
        close_fd(fd)
        return None
    sock.setblocking(False)
    return sock


def close_fd(fd: int) -> None:
    try:
        socket.close(fd)
    except OSError:
        pass
