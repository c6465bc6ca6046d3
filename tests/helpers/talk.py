"""Talking to the daemon as clients do: the default answers, reading to a suffix or EOF, client
threads whose every failure the test sees."""

from __future__ import annotations

import errno
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

from .timing import scaled, wait_for

# The default answer table (lancelotd.config.DEFAULT_ANSWERS, which loadgen checks too).
NAME_Q, NAME_A = b"What is your name?", b"My name is Sir Lancelot of Camelot."
QUEST_Q, QUEST_A = b"What is your quest?", b"To seek the Holy Grail."
COLOR_Q, COLOR_A = b"What is your favorite color?", b"Blue."
TOO_LONG = b"Error: question too long."
NOT_ASCII = b"Error: questions must be ASCII."


def recv_until(sock: socket.socket, suffix: bytes, limit: int = 1 << 20) -> bytes:
    """Everything up to `suffix`; EOFError when the server closes first."""
    data = b""
    while not data.endswith(suffix):
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError(f"connection closed after {data!r}")
        data += chunk
        if len(data) > limit:
            raise AssertionError("answer too long")
    return data


def recv_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (EOF)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def ask(port: int, question: bytes = NAME_Q, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """One question on a new connection; the answer up to its '.'."""
    with socket.create_connection((host, port), timeout=scaled(timeout)) as sock:
        sock.sendall(question)
        return recv_until(sock, b".")


def ask_on(sock: socket.socket, question: bytes) -> bytes:
    sock.sendall(question)
    return recv_until(sock, b".")


class Backlog:
    """A client that pipelines questions without reading until the server stops reading from it.

    The server then owes it answers it cannot send (back-pressure), so the worker holding the
    connection has to keep it: it can neither close it nor hand it to another worker before
    those answers are out.  `settle()` reads them all, and the connection is idle again.
    """

    STREAM = memoryview(NAME_Q * 8192)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0

    def fill(self, stall: float = 0.3, timeout: float = 20.0) -> Backlog:
        sock = self.sock
        sock.setblocking(False)
        deadline = time.monotonic() + scaled(timeout)
        while True:
            _, writable, _ = select.select([], [sock], [], scaled(stall))
            if not writable:
                return self  # nothing taken for `stall` seconds: the server stopped reading
            try:
                self.sent += sock.send(self.STREAM[self.sent % len(NAME_Q):])
            except BlockingIOError:
                pass
            assert time.monotonic() < deadline, "the server never stopped reading"

    def settle(self, timeout: float = 20.0) -> None:
        """Finish the last question, read every answer owed; the socket is blocking again."""
        sock = self.sock
        rest = NAME_Q[self.sent % len(NAME_Q):] if self.sent % len(NAME_Q) else b""
        questions = -(-self.sent // len(NAME_Q))
        expected = questions * len(NAME_A)
        got = bytearray()
        deadline = time.monotonic() + scaled(timeout)
        while len(got) < expected:
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(got)} of {expected} answer bytes"
            readable, writable, _ = select.select([sock], [sock] if rest else [], [], left)
            if readable:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise EOFError(f"EOF after {len(got)} of {expected} answer bytes")
                got += chunk
            if writable and rest:
                try:
                    rest = rest[sock.send(rest):]
                except BlockingIOError:
                    pass
        assert got == NAME_A * questions
        sock.settimeout(scaled(5))


class CheckedThread(threading.Thread):
    """A test's helper thread (a daemon) whose failure the test sees: whatever ends `target` with an
    exception is kept in `error`, and `finish()` joins the thread and raises it in the main thread.

    Without it an exception only ends the thread; pytest turns that into an error of whichever
    test is running when it notices (pyproject.toml), but a thread's loop that should go on
    must record its failures itself (Asker, handoff Client) and the test must assert on them.
    """

    def __init__(self, target: Callable[..., object], *args: object, name: str | None = None) -> None:
        super().__init__(target=target, args=args, name=name, daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as e:  # noqa: BLE001 - every kind of failure counts, raised by check()
            self.error = e

    def check(self) -> None:
        """Raise here what ended the thread, if anything did."""
        if self.error is not None:
            raise AssertionError(f"{self.name} failed: {self.error!r}") from self.error

    def finish(self, timeout: float = 10.0) -> None:
        """Join the thread (it must end within scaled(`timeout`)), then check()."""
        self.join(scaled(timeout))
        assert not self.is_alive(), f"{self.name} still running after {scaled(timeout):g}s"
        self.check()


def outcome(sock: socket.socket) -> str:
    """What became of the question sent on `sock`: "answered", or what went wrong instead."""
    try:
        answer = recv_until(sock, b".")
    except ConnectionResetError:
        return "reset"
    except EOFError:
        return "EOF without answer"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, repr(e))
    except Exception as e:  # noqa: BLE001 - whatever it is, the test counts it
        return repr(e)
    return "answered" if answer == NAME_A else f"wrong answer {answer!r}"


class Asker(CheckedThread):
    """Clients asking NAME_Q in a loop, each question on a new connection, in a thread; every
    outcome counted by kind ("answered", "refused", or outcome()'s name of what went wrong).

    `burst` connections are opened before any answer is read, so that connections queue on the
    listener now and then, as a busy server has them.  As a context manager it waits for the
    first outcome, and at the end stops and joins the thread (raising what ended it, if anything).
    """

    def __init__(self, port: int, host: str = "127.0.0.1", burst: int = 1, pause: float = 0.005,
                 timeout: float = 5.0) -> None:
        super().__init__(self._loop, name=f"asker of {host}:{port}")
        self.port, self.host, self.burst, self.pause, self.timeout = port, host, burst, pause, timeout
        self.outcomes: Counter[str] = Counter()
        self.stop = threading.Event()

    @property
    def ok(self) -> int:
        return self.outcomes["answered"]

    def bad(self, *also_fine: str) -> Counter[str]:
        """The outcomes other than "answered" and `also_fine`."""
        return Counter({k: n for k, n in self.outcomes.items() if k != "answered" and k not in also_fine})

    def _loop(self) -> None:
        while not self.stop.is_set():
            socks = []
            for _ in range(self.burst):
                try:
                    sock = socket.create_connection((self.host, self.port), timeout=scaled(self.timeout))
                except ConnectionRefusedError:
                    self.outcomes["refused"] += 1
                    continue
                except OSError as e:
                    self.outcomes[errno.errorcode.get(e.errno or 0, repr(e))] += 1
                    continue
                socks.append(sock)
                try:
                    sock.sendall(NAME_Q)
                except OSError:
                    pass  # the reading tells what became of it
            for sock in socks:
                with sock:
                    self.outcomes[outcome(sock)] += 1
            self.stop.wait(self.pause)

    def __enter__(self) -> Asker:
        self.start()
        wait_for(lambda: self.outcomes or self.error, 5, "the first outcome of the asker")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if exc[0] is None:
            self.finish()
        else:  # the test failed already: that is the news
            self.join(scaled(10))


def connect(port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> socket.socket:
    """A connection to `host`:`port` from the local address `source` (the client the access rules see)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(scaled(5))
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def admitted(port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> bool:
    """Ask one question from `source`: True if answered, False if closed at once (with a FIN)."""
    with connect(port, source, host) as sock:
        return served(sock)


def served(sock: socket.socket) -> bool:
    """One question on `sock`: True if answered; False on EOF (a reset fails the test)."""
    try:
        sock.sendall(NAME_Q)
    except BrokenPipeError:
        return False
    data = sock.recv(4096)  # ConnectionResetError here: refused with a reset, which we never do
    assert data in (b"", NAME_A), data
    return data == NAME_A


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed `sock` with a FIN, having sent nothing more."""
    sock.settimeout(scaled(10))
    return sock.recv(4096) == b""
