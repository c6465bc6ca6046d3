"""Helpers shared by the integration tests: one definition each, imported by the test modules.

Timing on slow machines: every wait and every timing threshold of the tests goes
through `scaled()`, which multiplies seconds by ``LANCELOTD_TEST_TIME_FACTOR``
(a positive number, default 1.0).  On a loaded CI runner or under a sanitizer,
``LANCELOTD_TEST_TIME_FACTOR=3 pytest`` gives every `wait_for`, every "answered in
under 100 ms" and every "replaced within a second" three times as long.  What the
daemon is configured to do (a graceful_timeout, a watchdog interval) and the
observation windows of a load pattern are not scaled: they are the behaviour under
test, not the patience of the test.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import psutil

if TYPE_CHECKING:
    from conftest import Daemon

# The tests use psutil 6's name; Debian 12's python3-psutil (5.9.4, the package's floor) has the
# same call as connections().  The daemon itself uses neither.
if not hasattr(psutil.Process, "net_connections"):
    psutil.Process.net_connections = psutil.Process.connections  # type: ignore[attr-defined]


def _time_factor() -> float:
    raw = os.environ.get("LANCELOTD_TEST_TIME_FACTOR", "1")
    try:
        factor = float(raw)
    except ValueError:
        raise SystemExit(f"LANCELOTD_TEST_TIME_FACTOR={raw!r} is not a number") from None
    if not factor > 0:
        raise SystemExit(f"LANCELOTD_TEST_TIME_FACTOR={raw!r} must be above 0")
    return factor


TIME_FACTOR = _time_factor()


def scaled(seconds: float) -> float:
    """`seconds` stretched by LANCELOTD_TEST_TIME_FACTOR (see the module docstring)."""
    return seconds * TIME_FACTOR


# The default answer table (lancelotd.config.DEFAULT_ANSWERS, which loadgen checks too).
NAME_Q, NAME_A = b"What is your name?", b"My name is Sir Lancelot of Camelot."
QUEST_Q, QUEST_A = b"What is your quest?", b"To seek the Holy Grail."
COLOR_Q, COLOR_A = b"What is your favorite color?", b"Blue."
TOO_LONG = b"Error: question too long."
NOT_ASCII = b"Error: questions must be ASCII."

LISTENING = re.compile(r"listening on (\S+):(\d+)$", re.M)
WORKER_TITLE = re.compile(r"^lancelotd: worker (\d+) \[gen (\d+)\]")


# --- waiting ---------------------------------------------------------------------

def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy; fail after scaled(`timeout`)."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


# --- threads ---------------------------------------------------------------------

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


# --- processes -------------------------------------------------------------------

def title(proc: psutil.Process) -> str:
    """The process title as `ps` shows it (setproctitle rewrites the cmdline); "" once gone."""
    try:
        return " ".join(part for part in proc.cmdline() if part).strip()
    except psutil.Error:
        return ""


def gone(pid: int) -> bool:
    """True when `pid` no longer runs (a zombie nobody reaped counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def live_children(pid: int) -> list[psutil.Process] | None:
    """The non-zombie children of `pid` (None if it is gone or one vanished while looking)."""
    try:
        return [c for c in psutil.Process(pid).children() if c.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return None


def workers_of(master_pid: int) -> dict[int, tuple[int, int]]:
    """pid -> (number, generation) of the live (non-zombie) children that already call
    themselves workers (a child just forked still carries the master's title)."""
    try:
        children = psutil.Process(master_pid).children()
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            match = WORKER_TITLE.match(title(child))
        except psutil.Error:
            continue
        if match:
            found[child.pid] = (int(match.group(1)), int(match.group(2)))
    return found


def wait_pool(master_pid: int, count: int, generation: int | None = None, timeout: float = 10.0,
              ) -> dict[int, tuple[int, int]]:
    """Wait until the master has exactly `count` live children, all workers (of `generation`)."""
    def pool() -> dict[int, tuple[int, int]] | None:
        live = live_children(master_pid)
        workers = workers_of(master_pid)
        if live is None or len(live) != count or len(workers) != count:
            return None
        if generation is not None and any(g != generation for _, g in workers.values()):
            return None
        return workers
    what = f"{count} workers" + (f" of generation {generation}" if generation else "")
    return wait_for(pool, timeout, what)  # type: ignore[return-value]


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


def server_inode(sock: socket.socket) -> int | None:
    """The inode of the server side of the client TCP socket `sock`, asked of the kernel by its
    exact address pair (sock_diag, not a dump).

    Not from /proc/net/tcp (psutil's way): the kernel walks that table in chunks while other
    sockets come and go, and on a machine busy with other connections whole entries are missed
    (seen: 17 of 40 established loopback connections, at 130,000 lines in /proc/net/tcp).
    """
    family = sock.family
    client, server = sock.getsockname(), sock.getpeername()

    def raw(host: str) -> bytes:
        return socket.inet_pton(family, host.partition("%")[0]).ljust(16, b"\0")
    sockid = (struct.pack("!HH", server[1], client[1]) + raw(server[0]) + raw(client[0])
              + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))  # any interface, no cookie
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = struct.pack("=IHHII", 16 + len(request), 20, 1, 1, 0)  # SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as diag:  # NETLINK_SOCK_DIAG
        diag.settimeout(5)
        diag.send(header + request)
        reply = diag.recv(65536)
    if len(reply) < 88 or struct.unpack_from("=H", reply, 4)[0] != 20:  # NLMSG_ERROR: no such socket
        return None
    return struct.unpack_from("=I", reply, 16 + 68)[0]  # inet_diag_msg.idiag_inode


def holder_of(sock: socket.socket, pids: list[int]) -> int | None:
    """The worker (among `pids`) that holds the server side of the client socket `sock`."""
    inode = server_inode(sock)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:  # closed meanwhile
                    pass
        except OSError:  # the process is gone
            pass
    return None


def wait_child_exit(pid: int, timeout: float = 10.0) -> int:
    """Exit code of a child of ours (an orphan reparented to us: the session is a subreaper)."""
    def reaped() -> int | None:
        done, status = os.waitpid(pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) + 1000 if done else None  # +1000: 0 is falsy
    return wait_for(reaped, timeout, f"process {pid} to exit") - 1000  # type: ignore[operator]


def dead_pid() -> int:
    """A PID that names no process now (a child of ours, started and reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def clean_env() -> dict[str, str]:
    """Our environment without LANCELOTD_CONFIG (a developer's own must not leak into a test)."""
    env = dict(os.environ)
    env.pop("LANCELOTD_CONFIG", None)
    return env


def lancelotd_cli(*args: str, timeout: float = 30,
                  cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`lancelotd ARGS...` run to its end, its output captured."""
    return subprocess.run([sys.executable, "-m", "lancelotd", *args], capture_output=True, text=True,
                          timeout=scaled(timeout), env=clean_env(), stdin=subprocess.DEVNULL, cwd=cwd)


# --- files and logs --------------------------------------------------------------

def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def wait_log(path: Path, pattern: str, count: int = 1, timeout: float = 10.0) -> list[re.Match]:
    """Wait until `pattern` (a regex) matches at least `count` lines of the log file."""
    regex = re.compile(pattern, re.M)

    def found() -> list[re.Match] | None:
        matches = list(regex.finditer(read(path)))
        return matches if len(matches) >= count else None
    try:
        return wait_for(found, timeout, f"{count} x {pattern!r} in {path.name}")  # type: ignore[return-value]
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- {path}:\n{read(path)[-4000:]}") from None


def ready_from(daemon: Daemon, log_path: Path, workers: int) -> Daemon:
    """Readiness for a daemon that logs to `log_path` instead of stderr: PID file, port, workers."""
    def pid_file() -> bool:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"lancelotd exited with {daemon.proc.returncode}:\n{daemon.log()}"
                                 f"\n{read(log_path)}")
        return daemon.pid_file.exists()
    wait_for(pid_file, 10, "the PID file")
    daemon.port = int(wait_log(log_path, LISTENING.pattern)[0].group(2))
    wait_pool(daemon.proc.pid, workers)
    return daemon


# --- talking ---------------------------------------------------------------------

def recv_until(sock: socket.socket, suffix: bytes, limit: int = 1 << 20) -> bytes:
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
        sock.settimeout(5)


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
