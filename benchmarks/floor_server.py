#!/usr/bin/env python3
"""The floor: the least a Python prefork server can do per answer, to measure lancelotd against.

    python benchmarks/floor_server.py PORT WORKERS

A master binds 127.0.0.1:PORT and forks WORKERS processes; each polls the
shared listener (EPOLLEXCLUSIVE) and its connections, and answers a read
that is one whole known question with one dict lookup and one send, as
lancelotd's hot path does; other reads by peer_protocol.py (pipelined
questions, an unfinished one kept for the next read, errors).  Nothing else:
no idle timeouts, no limits, no fairness, no back-pressure, no lifecycle, no
status.  Not a server to run: a yardstick for `ab.py floor` and the bare
epoll peer of `peers.py` (see README.md).  SIGTERM stops it.
"""

from __future__ import annotations

import _socket
import select
import socket
import sys

from peer_protocol import ANSWERS, answer, prefork


def serve(listener: socket.socket) -> None:
    epoll = select.epoll()
    listen_fd = listener.fileno()
    epoll.register(listen_fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
    accept = listener._accept  # a descriptor and a plain _socket.socket, as lancelotd's acceptor does
    socks: dict[int, _socket.socket] = {}
    rests: dict[int, bytes] = {}  # an unfinished question, by connection
    exact = ANSWERS.get
    poll = epoll.poll
    while True:
        for fd, _ in poll():
            sock = socks.get(fd)
            if sock is None:
                if fd == listen_fd:
                    for _ in range(16):
                        try:
                            new_fd, _addr = accept()
                        except BlockingIOError:
                            break
                        conn = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, new_fd)
                        conn.setblocking(False)
                        socks[new_fd] = conn
                        epoll.register(new_fd, select.EPOLLIN)
                continue
            try:
                data = sock.recv(16384)
            except OSError:
                data = b""
            if not data:
                del socks[fd]
                rests.pop(fd, None)
                sock.close()
                continue
            out = None if fd in rests else exact(data)
            close = False
            if out is None:
                out, rest, close = answer(rests.pop(fd, b"") + data)
                if rest:
                    rests[fd] = rest
            try:
                if out:
                    sock.send(out)
            except OSError:
                close = True
            if close:
                del socks[fd]
                rests.pop(fd, None)
                sock.close()


def main() -> int:
    return prefork(int(sys.argv[1]), int(sys.argv[2]), serve, "floor_server")


if __name__ == "__main__":
    sys.exit(main())
