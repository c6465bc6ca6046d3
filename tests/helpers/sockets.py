"""Sockets as the kernel sees them: which process holds what, asked of the sockets themselves.

Not psutil's net_connections() nor /proc/net/tcp: the kernel walks that table in chunks while
other sockets come and go, and on a machine busy with other connections whole entries are
missed (seen: 17 of 40 established loopback connections, at 130,000 lines in /proc/net/tcp),
and a connection seen missing passes for closed.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from typing import NamedTuple

import psutil

from .timing import scaled

# The tests use psutil 6's name; Debian 12's python3-psutil (5.9.4, the package's floor) has the
# same call as connections().  The daemon itself uses neither.
if not hasattr(psutil.Process, "net_connections"):
    psutil.Process.net_connections = psutil.Process.connections  # type: ignore[attr-defined]


class Addr(NamedTuple):
    ip: str
    port: int


class TcpSocket(NamedTuple):
    """What psutil's net_connections() gives, for the attributes the tests use."""

    fd: int
    status: str
    laddr: Addr
    raddr: Addr | tuple


TCP_STATES = {1: psutil.CONN_ESTABLISHED, 2: psutil.CONN_SYN_SENT, 3: psutil.CONN_SYN_RECV,
              4: psutil.CONN_FIN_WAIT1, 5: psutil.CONN_FIN_WAIT2, 6: psutil.CONN_TIME_WAIT,
              7: psutil.CONN_CLOSE, 8: psutil.CONN_CLOSE_WAIT, 9: psutil.CONN_LAST_ACK,
              10: psutil.CONN_LISTEN, 11: psutil.CONN_CLOSING}
_LIBC = ctypes.CDLL(None, use_errno=True)
SYS_PIDFD_GETFD = 438  # the same number on every architecture (the syscall table is unified there)


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """The TCP sockets process `pid` holds, each asked of the socket itself.

    Each descriptor is duplicated into this process (pidfd_getfd(2): root, or the same user
    under ptrace rules) and asked its addresses and TCP state.  Not psutil's net_connections(),
    which walks /proc/net/tcp: on a machine busy with other connections the kernel's chunked
    walk misses entries, and a connection seen missing passes for closed.  Raises
    psutil.NoSuchProcess when the process is gone.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise psutil.NoSuchProcess(pid) from None
    found = []
    try:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            raise psutil.NoSuchProcess(pid) from None
        for name in names:
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:["):
                    continue
            except OSError:
                continue
            fd = _LIBC.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                continue
            with socket.socket(fileno=fd) as sock:  # our duplicate: closing it closes nothing of theirs
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    continue
                state = TCP_STATES.get(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0], "NONE")
                try:
                    peer: Addr | tuple = Addr(*sock.getpeername()[:2])
                except OSError:
                    peer = ()
                found.append(TcpSocket(int(name), state, Addr(*sock.getsockname()[:2]), peer))
    finally:
        os.close(pidfd)
    return found


def held(pid: int, port: int, status: str | None = psutil.CONN_ESTABLISHED) -> int:
    """How many TCP sockets on local `port` process `pid` holds in `status` (None: connections in
    any state, that is sockets with a peer); 0 once the process is gone."""
    try:
        found = tcp_sockets(pid)
    except psutil.Error:
        return 0
    return sum(1 for c in found if c.laddr.port == port and (c.status == status if status else bool(c.raddr)))


def listening_ports(pid: int) -> set[int]:
    """The ports process `pid` listens on (TCP)."""
    return {c.laddr.port for c in tcp_sockets(pid) if c.status == psutil.CONN_LISTEN}


def _server_side(sock: socket.socket) -> bytes | None:
    """The kernel's inet_diag_msg for the server side of the client TCP socket `sock`, asked by its
    exact address pair (sock_diag, not a dump); None when there is no such socket."""
    family = sock.family
    client, server = sock.getsockname(), sock.getpeername()

    def raw(host: str) -> bytes:
        return socket.inet_pton(family, host.partition("%")[0]).ljust(16, b"\0")
    sockid = (struct.pack("!HH", server[1], client[1]) + raw(server[0]) + raw(client[0])
              + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))  # any interface, no cookie
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = struct.pack("=IHHII", 16 + len(request), 20, 1, 1, 0)  # SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as diag:  # NETLINK_SOCK_DIAG
        diag.settimeout(scaled(5))
        diag.send(header + request)
        reply = diag.recv(65536)
    if len(reply) < 88 or struct.unpack_from("=H", reply, 4)[0] != 20:  # NLMSG_ERROR: no such socket
        return None
    return reply[16:]  # past the netlink header


def server_inode(sock: socket.socket) -> int | None:
    """The inode of the server side of the client TCP socket `sock`."""
    msg = _server_side(sock)
    return None if msg is None else struct.unpack_from("=I", msg, 68)[0]  # idiag_inode


def server_rx_queue(sock: socket.socket) -> int | None:
    """Bytes the server has not read yet from the client TCP socket `sock`."""
    msg = _server_side(sock)
    return None if msg is None else struct.unpack_from("=I", msg, 56)[0]  # idiag_rqueue


def holder_of(sock: socket.socket, pids: list[int]) -> int | None:
    """The worker (among `pids`) that holds the server side of the client socket `sock`."""
    inode = server_inode(sock)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    return next((pid for pid in pids if target in open_files(pid).values()), None)


def open_files(pid: int) -> dict[int, str]:
    """What each descriptor of process `pid` names (/proc/PID/fd); empty when it is gone."""
    found = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # the process is gone
        return found
    for name in names:
        try:
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed meanwhile
            pass
    return found
