"""Connections handed from worker to worker at a reload or an upgrade: a config whose `Color?`
answer tells the generations apart, clients that notice an answer lost, repeated or out of
order, and the workers' hand-off log lines."""

from __future__ import annotations

import os
import re
import socket
import threading
import time

from .daemon import Daemon
from .talk import recv_until
from .timing import scaled, wait_for

HANDOFF_Q = b"Color?"  # answered by the config's `color`: which generation served it
BLUE, GREEN = b"Blue.", b"Green."
# "[pid] worker N: handed K connections over (L left)"
HANDED = re.compile(r"\[(\d+)\] worker \d+: handed (\d+) connections over \((\d+) left\)")
GRACE = 30  # graceful_timeout: a drain (the fallback) is never mistaken for a hand-off
# Questions an ExactlyOnce client asks in turn, each with its own answer (in every config).
ROTATION = [(f"Q{i}?".encode(), f"A{i}.".encode()) for i in range(7)]
ROTATION_ANSWERS = "\n".join(f'"{q.decode()}" = "{a.decode()}"' for q, a in ROTATION)


def handoff_conf(workers: int = 2, color: str = "Blue.", max_connections: int | None = None,
                 lifecycle: str = "") -> str:
    """A complete config: the default questions (loadgen checks them) plus `Color?`."""
    limit = f"max_connections = {max_connections}" if max_connections else ""
    return f"""
[server]
workers = {workers}

[protocol]
unknown_answer = "No idea."
{limit}

[lifecycle]
graceful_timeout = {GRACE}
{lifecycle}

[answers]
"What is your name?" = "My name is Sir Lancelot of Camelot."
"What is your quest?" = "To seek the Holy Grail."
"What is your favorite color?" = "Blue."
"Color?" = "{color}"
{ROTATION_ANSWERS}
"""


def rewrite(d: Daemon, text: str) -> None:
    """Replace the config file atomically: a HUP never reads half a file."""
    tmp = d.config_file.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, d.config_file)


class Client:
    """One persistent connection asking `question` every `pause` seconds, in a thread.

    `expected` lists the acceptable answers from oldest config to newest: an answer
    outside it, or older than one already seen, is an error, as are EOF, a reset and a
    timeout.  The first error ends the client.
    """

    def __init__(self, sock: socket.socket, expected: list[bytes], question: bytes = HANDOFF_Q,
                 pause: float = 0.003, name: str = "client") -> None:
        self.sock, self.expected, self.question, self.pause, self.name = sock, expected, question, pause, name
        sock.settimeout(scaled(5))
        self.answers: list[tuple[float, bytes]] = []  # (monotonic time received, answer)
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        newest = 0
        while not self.stopping.is_set():
            try:
                self.sock.sendall(self.question)
                answer = recv_until(self.sock, b".")
            except Exception as e:  # noqa: BLE001 - every kind of failure counts
                self.errors.append(f"{self.name}: {e!r} after {len(self.answers)} answers")
                return
            self.answers.append((time.monotonic(), answer))
            if answer not in self.expected:
                self.errors.append(f"{self.name}: wrong answer {answer!r}")
                return
            index = self.expected.index(answer)
            if index < newest:
                self.errors.append(f"{self.name}: {answer!r} after {self.expected[newest]!r}")
                return
            newest = index
            time.sleep(self.pause)

    def __enter__(self) -> Client:
        self.thread.start()
        self.wait_more(3)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(scaled(10))

    @property
    def last(self) -> bytes | None:
        return self.answers[-1][1] if self.answers else None

    def wait_more(self, count: int, timeout: float = 5.0) -> None:
        """Wait for `count` more answers (fails at once when the client has failed)."""
        target = len(self.answers) + count

        def more() -> bool:
            assert not self.errors, self.errors
            return len(self.answers) >= target
        wait_for(more, timeout, f"{count} more answers for {self.name}")

    def first(self, answer: bytes) -> float | None:
        """When `answer` first arrived."""
        return next((t for t, a in self.answers if a == answer), None)

    def check(self) -> None:
        assert not self.errors, self.errors
        assert not self.thread.is_alive(), f"{self.name} still running"


class ExactlyOnce(Client):
    """Asks the ROTATION questions in turn, one at a time: a question answered twice or never
    shows as a wrong answer (the next one's) or a timeout, as does EOF or a reset."""

    def __init__(self, sock: socket.socket, name: str = "client") -> None:
        super().__init__(sock, [a for _, a in ROTATION], name=name)
        sock.settimeout(scaled(10))  # a connection in flight waits for its target's answer

    def _run(self) -> None:
        for i in range(1 << 30):
            if self.stopping.is_set():
                return
            question, expected = ROTATION[i % len(ROTATION)]
            try:
                self.sock.sendall(question)
                answer = recv_until(self.sock, b".")
            except Exception as e:  # noqa: BLE001 - every kind of failure counts
                self.errors.append(f"{self.name}: {e!r} after {len(self.answers)} answers")
                return
            self.answers.append((time.monotonic(), answer))
            if answer != expected:
                self.errors.append(f"{self.name}: {answer!r} to {question!r}: an answer lost or repeated")
                return
            time.sleep(self.pause)


def handed(log: str) -> dict[int, list[tuple[int, int]]]:
    """pid -> [(handed, left), ...] from the workers' hand-off lines."""
    found: dict[int, list[tuple[int, int]]] = {}
    for m in HANDED.finditer(log):
        found.setdefault(int(m.group(1)), []).append((int(m.group(2)), int(m.group(3))))
    return found
