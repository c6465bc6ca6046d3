"""Closed-loop load for the systemd and cluster tests: many clients asking, every answer checked.

    python lancelot_load.py --port 1060 --persistent 8 --per-request 8
    python lancelot_load.py --host 198.18.0.1 --retry --think 0.01 ...   # through a load balancer

Persistent clients ask question after question on one connection (and open a
new one after an error); per-request clients open a connection per question,
so they notice at once when nobody accepts.  Runs in the sandbox's network
namespace (sdsandbox.Sandbox.net_popen) or the cluster's client namespace
(tests/cluster.py).  Protocol on stdio:

* prints "running" once every client has had a correct answer;
* for each line read on stdin prints "mark <answers so far> <errors so far>";
* at EOF on stdin stops the clients and prints a JSON summary:
  {"answers": N, "errors": N, "kinds": {kind: N}, "samples": [...], "marks": [[N, N], ...],
   "first_attempt_failures": N, "first_kinds": {kind: N}, "retried_ok": N, "reconnects": N,
   "connections": N, "max_latency_s": F}.

With --retry a client keeps the protocol's contract (README, "The protocol"): a question
whose connection fails (refused, reset, EOF before its answer) is asked again, once, on a
new connection.  It is then an error only if that retry fails too; the first failure
counts in first_attempt_failures (what a client without retry would have lost).  A
persistent connection found closed before the next question is sent (the server closed it
at an idle point) is a reconnect, not a failure: the question goes on a new connection.
Without --retry every failure is an error, as the systemd tests expect.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import threading
import time
from collections import Counter

QA = [(b"What is your name?", b"My name is Sir Lancelot of Camelot."),
      (b"What is your quest?", b"To seek the Holy Grail."),
      (b"What is your favorite color?", b"Blue.")]


class Stats:
    def __init__(self, clients: int) -> None:
        self.lock = threading.Lock()
        self.answers = 0
        self.kinds: Counter[str] = Counter()
        self.first_kinds: Counter[str] = Counter()
        self.retried_ok = 0
        self.reconnects = 0
        self.connections = 0
        self.max_latency = 0.0
        self.samples: list[str] = []
        self.started: set[int] = set()
        self.clients = clients
        self.all_started = threading.Event()

    def answered(self, client: int, latency: float, retried: bool) -> None:
        with self.lock:
            self.answers += 1
            self.retried_ok += retried
            self.max_latency = max(self.max_latency, latency)
            if client not in self.started:
                self.started.add(client)
                if len(self.started) == self.clients:
                    self.all_started.set()

    def failed(self, kind: str, detail: str, first_attempt: bool = False) -> None:
        with self.lock:
            (self.first_kinds if first_attempt else self.kinds)[kind] += 1
            if len(self.samples) < 20:
                what = "first attempt " if first_attempt else ""
                self.samples.append(f"{time.strftime('%H:%M:%S')} {what}{kind}: {detail}")

    def count(self, what: str) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.answers, sum(self.kinds.values())

    def summary(self, marks: list[tuple[int, int]]) -> dict:
        with self.lock:
            return {"answers": self.answers, "errors": sum(self.kinds.values()), "kinds": dict(self.kinds),
                    "samples": self.samples, "marks": marks,
                    "first_attempt_failures": sum(self.first_kinds.values()),
                    "first_kinds": dict(self.first_kinds), "retried_ok": self.retried_ok,
                    "reconnects": self.reconnects, "connections": self.connections,
                    "max_latency_s": round(self.max_latency, 4)}


def kind_of(error: Exception) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, EOFError):
        return "closed"
    return type(error).__name__


def recv_answer(sock: socket.socket, buffer: bytearray) -> bytes:
    while (end := buffer.find(b".")) < 0:
        data = sock.recv(4096)
        if not data:
            raise EOFError(f"closed after {bytes(buffer)!r}")
        buffer += data
    answer = bytes(buffer[:end + 1])
    del buffer[:end + 1]
    return answer


def ended(sock: socket.socket) -> bool:
    """Whether the server has closed (EOF or reset) this idle connection already."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Client:
    """One closed-loop client: a question, its answer, (think), the next question."""

    def __init__(self, number: int, args: argparse.Namespace, per_request: bool, stats: Stats) -> None:
        self.number, self.args, self.per_request, self.stats = number, args, per_request, stats
        self.sock: socket.socket | None = None
        self.buffer = bytearray()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def ask(self, question: bytes) -> bytes:
        if self.sock is None:
            self.sock = socket.create_connection((self.args.host, self.args.port), timeout=self.args.timeout)
            self.buffer.clear()
            self.stats.count("connections")
        self.sock.sendall(question)
        return recv_answer(self.sock, self.buffer)

    def one(self, question: bytes, expected: bytes) -> bool:
        """Ask one question (again, once, with --retry); whether it was answered right."""
        if self.args.retry and self.sock is not None and ended(self.sock):
            self.stats.count("reconnects")
            self.close()
        start = time.monotonic()
        retried = False
        while True:
            try:
                answer = self.ask(question)
                break
            except (OSError, EOFError) as e:
                self.close()
                if self.args.retry and not retried:
                    self.stats.failed(kind_of(e), str(e), first_attempt=True)
                    retried = True
                    continue
                self.stats.failed(kind_of(e), str(e))
                return False
        if self.per_request:
            self.close()
        if answer != expected:
            self.stats.failed("wrong", f"{question!r} -> {answer!r}")
            return False
        self.stats.answered(self.number, time.monotonic() - start, retried)
        return True

    def run(self, stop: threading.Event) -> None:
        i = self.number
        while not stop.is_set():
            question, expected = QA[i % len(QA)]
            i += 1
            try:
                answered = self.one(question, expected)
            except Exception as e:  # noqa: BLE001 - counted, never a silent end of this client
                self.close()
                self.stats.failed(type(e).__name__, repr(e))
                answered = False
            if not answered:
                time.sleep(0.01)  # no busy loop against a port nobody serves
            elif self.args.think:
                stop.wait(self.args.think)
        self.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1060)
    parser.add_argument("--persistent", type=int, default=8)
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--retry", action="store_true", help="ask again, once, on a new connection")
    parser.add_argument("--think", type=float, default=0.0, help="seconds after an answer")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds for a connection, and for each answer on it")
    parser.add_argument("--start-timeout", type=float, default=15.0,
                        help="seconds for every client's first answer")
    args = parser.parse_args()
    kinds = [False] * args.persistent + [True] * args.per_request
    stats = Stats(len(kinds))
    stop = threading.Event()
    threads = [threading.Thread(target=Client(n, args, per_request, stats).run, args=(stop,), daemon=True)
               for n, per_request in enumerate(kinds)]
    for thread in threads:
        thread.start()
    marks = []
    if stats.all_started.wait(args.start_timeout):
        print("running", flush=True)
    else:
        print("not running: some clients never got an answer", flush=True)
    for _ in sys.stdin:
        marks.append(stats.counts())
        print(f"mark {marks[-1][0]} {marks[-1][1]}", flush=True)
    stop.set()
    for thread in threads:
        thread.join(args.timeout + 5)  # a client stops after its question in flight
    print(json.dumps(stats.summary(marks)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
