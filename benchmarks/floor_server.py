#!/usr/bin/env python3
"""The floor: the least a Python prefork server can do per answer, to measure lancelotd against.

    python benchmarks/floor_server.py PORT WORKERS

A master binds 127.0.0.1:PORT and forks WORKERS processes; each polls the
shared listener (EPOLLEXCLUSIVE) and its connections, and answers a read
that is one whole known question with one dict lookup and one send, as
lancelotd's hot path does.  Nothing else: no idle timeouts, no limits, no
fairness, no back-pressure, no lifecycle, no status.  Pipelined questions
are answered too, so that loadgen sees no errors.  Not a server to run: a
yardstick for `ab.py floor` (see README.md).  SIGTERM stops it.
"""

from __future__ import annotations

import _socket
import os
import select
import signal
import socket
import sys

ANSWERS = {
    b"What is your name?": b"My name is Sir Lancelot of Camelot.",
    b"What is your quest?": b"To seek the Holy Grail.",
    b"What is your favorite color?": b"Blue.",
}
UNKNOWN = b"I don't know that."


def answer_each(data: bytes) -> bytes:
    """Pipelined reads: every complete question (loadgen never splits one)."""
    return b"".join(ANSWERS.get(q.strip() + b"?", UNKNOWN) for q in data.split(b"?")[:-1])


def serve(listener: socket.socket) -> None:
    epoll = select.epoll()
    listen_fd = listener.fileno()
    epoll.register(listen_fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
    accept = listener._accept  # a descriptor and a plain _socket.socket, as lancelotd's acceptor does
    socks: dict[int, _socket.socket] = {}
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
                sock.close()
                continue
            out = exact(data)
            if out is None:
                out = answer_each(data)
            try:
                sock.send(out)
            except OSError:
                del socks[fd]
                sock.close()


def main() -> int:
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
            try:
                serve(listener)
            finally:
                os._exit(1)
        pids.append(pid)
    print(f"READY floor_server port={port} pid={os.getpid()} workers={workers}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
