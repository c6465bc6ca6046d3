"""The Lancelot protocol for the benchmark's peer servers (floor_server.py, peer_asyncio.py).

What a server must do to be compared with lancelotd fairly: answer every question of a read,
pipelined ones too, keep an unfinished question for the next read, and close after an error
line (docs/PROTOCOL.md).  A read that is exactly one known question (every read loadgen
makes) is answered with one dict lookup, as lancelotd's hot path does.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable

ANSWERS = {
    b"What is your name?": b"My name is Sir Lancelot of Camelot.",
    b"What is your quest?": b"To seek the Holy Grail.",
    b"What is your favorite color?": b"Blue.",
}
UNKNOWN = b"I don't know that."
TOO_LONG = b"Error: question too long."
NOT_ASCII = b"Error: questions must be ASCII."
MAX_QUESTION_BYTES = 1024
WHITESPACE = b" \t\r\n\x0b\x0c"


def answer(buffer: bytes) -> tuple[bytes, bytes, bool]:
    """Every complete question in `buffer` answered: (answers, the unfinished rest, close after)."""
    *questions, rest = buffer.split(b"?")
    out = []
    for question in questions:
        question = question.strip(WHITESPACE)
        if not question.isascii():
            return b"".join(out) + NOT_ASCII, b"", True
        if len(question) >= MAX_QUESTION_BYTES:
            return b"".join(out) + TOO_LONG, b"", True
        out.append(ANSWERS.get(question + b"?", UNKNOWN))
    if not rest.isascii():
        return b"".join(out) + NOT_ASCII, b"", True
    if len(rest.lstrip(WHITESPACE)) > MAX_QUESTION_BYTES:
        return b"".join(out) + TOO_LONG, b"", True
    return b"".join(out), rest, False


def prefork(port: int, workers: int, serve: Callable[[socket.socket], None], name: str) -> int:
    """Bind 127.0.0.1:PORT, fork `workers` processes that serve(listener), print READY, and on
    SIGTERM or SIGINT kill and reap them."""
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
    print(f"READY {name} port={port} pid={os.getpid()} workers={workers}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    for pid in pids:
        os.waitpid(pid, 0)
    return 0
