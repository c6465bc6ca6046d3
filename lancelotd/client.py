"""`lancelot ask`: a small client for the protocol.

It keeps the protocol's contract for clients (README, "The protocol"): a connection may end
between two questions (a drained or stopping host, a balancer's failover), so a question left
unanswered when its connection ends is asked again, once, on a new connection.  Answers are
idempotent, so asking twice is safe.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Iterator

from . import __version__


class ServerClosed(Exception):
    pass


def recv_answer(sock: socket.socket, buffer: bytearray) -> bytes:
    """One answer (up to and including '.'); bytes after it stay in `buffer`."""
    while True:
        end = buffer.find(b".")
        if end >= 0:
            answer = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            return answer
        data = sock.recv(4096)
        if not data:
            raise ServerClosed(bytes(buffer).decode("ascii", "replace"))
        buffer += data


def problem(question: str) -> str | None:
    """Why `question` cannot be sent as one question, or None.

    The server answers every '?' it receives, so a string with two would get
    two answers, and each later answer would be printed against the wrong question.
    """
    text = question.strip()
    if not text.isascii():
        return "questions must be ASCII"
    if text.count("?") > 1:
        return "holds more than one '?': ask each question as its own argument"
    if not text.endswith("?"):
        return "does not end with '?'"
    return None


ENDED = (ServerClosed, ConnectionResetError, BrokenPipeError)  # the connection ended under the question


def ask(host: str, port: int, questions: list[str], timeout: float = 10.0) -> Iterator[str]:
    """Ask each question in order on one connection; yields the answers in order.

    ValueError, before anything is sent, if a question is not exactly one question.  A question
    whose connection ends before its answer is asked again on a new one, once (answers are
    idempotent: the protocol's contract for clients).
    """
    for question in questions:
        reason = problem(question)
        if reason:
            raise ValueError(f"{question!r}: {reason}")
    wanted = [q.strip() for q in questions]
    asked = 0  # answered so far
    retried = -1  # the question already asked again
    while asked < len(wanted):
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                buffer = bytearray()
                while asked < len(wanted):
                    sock.sendall(wanted[asked].encode("ascii"))
                    answer = recv_answer(sock, buffer).decode("ascii", "replace")
                    asked += 1
                    yield answer
        except ENDED:
            if retried == asked:
                raise
            retried = asked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lancelot", description="Client for the lancelotd protocol.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_ask = sub.add_parser("ask", help="ask questions, print one answer a line")
    p_ask.add_argument("-H", "--host", default="127.0.0.1", help="server host (default 127.0.0.1)")
    p_ask.add_argument("-p", "--port", type=int, default=1060, help="server port (default 1060)")
    p_ask.add_argument("-t", "--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    p_ask.add_argument("questions", nargs="+", metavar="QUESTION")
    args = parser.parse_args(argv)
    where = f"{args.host}:{args.port}"
    refused = [f"lancelot: not asked: {q!r} {problem(q)}" for q in args.questions if problem(q)]
    if refused:
        print("\n".join(refused), file=sys.stderr)
        return 2
    try:
        for answer in ask(args.host, args.port, args.questions, args.timeout):
            print(answer, flush=True)
    except ServerClosed as e:
        partial = f" (it sent {str(e)!r})" if str(e) else ""
        print(f"lancelot: {where} closed the connection before answering{partial}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"lancelot: no answer from {where} within {args.timeout:g}s", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"lancelot: cannot talk to {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
