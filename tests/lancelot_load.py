"""Closed-loop load for the systemd tests: many clients asking, every answer checked.

    python lancelot_load.py --port 1060 --persistent 8 --per-request 8

Persistent clients ask question after question on one connection (and open a
new one after an error); per-request clients open a connection per question,
so they notice at once when nobody accepts.  Runs in the sandbox's network
namespace (sdsandbox.Sandbox.net_popen).  Protocol on stdio:

* prints "running" once every client has had a correct answer;
* for each line read on stdin prints "mark <answers so far> <errors so far>";
* at EOF on stdin stops the clients and prints a JSON summary:
  {"answers": N, "errors": N, "kinds": {kind: N}, "samples": [...], "marks": [[N, N], ...]}.
"""

from __future__ import annotations

import argparse
import json
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
        self.samples: list[str] = []
        self.started: set[int] = set()
        self.clients = clients
        self.all_started = threading.Event()

    def answered(self, client: int) -> None:
        with self.lock:
            self.answers += 1
            if client not in self.started:
                self.started.add(client)
                if len(self.started) == self.clients:
                    self.all_started.set()

    def failed(self, kind: str, detail: str) -> None:
        with self.lock:
            self.kinds[kind] += 1
            if len(self.samples) < 20:
                self.samples.append(f"{time.strftime('%H:%M:%S')} {kind}: {detail}")

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.answers, sum(self.kinds.values())


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


def client(number: int, port: int, per_request: bool, stats: Stats, stop: threading.Event) -> None:
    sock: socket.socket | None = None
    buffer = bytearray()
    i = number
    while not stop.is_set():
        question, expected = QA[i % len(QA)]
        i += 1
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                buffer.clear()
            sock.sendall(question)
            answer = recv_answer(sock, buffer)
            if answer != expected:
                stats.failed("wrong", f"{question!r} -> {answer!r}")
            else:
                stats.answered(number)
            if per_request:
                sock.close()
                sock = None
        except (OSError, EOFError) as e:
            stats.failed(kind_of(e), str(e))
            if sock is not None:
                sock.close()
                sock = None
            time.sleep(0.01)  # no busy loop against a port nobody serves
    if sock is not None:
        sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=1060)
    parser.add_argument("--persistent", type=int, default=8)
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--start-timeout", type=float, default=15.0)
    args = parser.parse_args()
    kinds = [False] * args.persistent + [True] * args.per_request
    stats = Stats(len(kinds))
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(n, args.port, per_request, stats, stop), daemon=True)
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
        thread.join(15)
    answers, errors = stats.counts()
    print(json.dumps({"answers": answers, "errors": errors, "kinds": dict(stats.kinds),
                      "samples": stats.samples, "marks": marks}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
