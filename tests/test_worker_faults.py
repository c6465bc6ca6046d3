"""Worker faults (issue 9): descriptor exhaustion, the last accept sweep at TERM,
a log file that cannot be reopened, and signals that arrive while a worker boots.

Real daemons on loopback (the `start_daemon` fixture reaps every process it
started).  The descriptor limit is lowered on the running worker with prlimit(2):
the master raises its soft limit to the hard one at start, so that is the
limit a worker would have been born with.
"""

from __future__ import annotations

import os
import re
import resource
import selectors
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import LISTENING, Daemon, wait_for

from lancelotd.limits import nofile_advice

NAME_Q, NAME_A = b"What is your name?", b"My name is Sir Lancelot of Camelot."


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_log(path: Path, pattern: str, count: int = 1, timeout: float = 10.0) -> list[re.Match]:
    regex = re.compile(pattern, re.M)

    def found() -> list[re.Match] | None:
        matches = list(regex.finditer(read(path)))
        return matches if len(matches) >= count else None
    try:
        return wait_for(found, timeout, f"{count} x {pattern!r} in {path.name}")  # type: ignore[return-value]
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- {path}:\n{read(path)[-4000:]}") from None


def ready_from(d: Daemon, log_path: Path, workers: int) -> None:
    """wait_ready() for a daemon that logs to its own file, not to stderr."""
    wait_for(lambda: d.pid_file.exists() or d.proc.poll() is not None, 10, "the PID file")
    assert d.proc.poll() is None, read(d.log_file) + read(log_path)
    d.port = int(wait_log(log_path, LISTENING.pattern)[0].group(2))
    d.wait_workers(workers)


def in_boot_delay(pid: int) -> bool:
    """The worker sleeps in LANCELOTD_TEST_BOOT_DELAY (nothing else in a worker sleeps)."""
    try:
        return "nanosleep" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False


# =================================================================================
# A. Descriptor exhaustion
# =================================================================================

@pytest.mark.parametrize(("max_connections", "workers", "limit", "usable"), [
    (10000, 2, 1024, 1006),
    (1010, 4, 1024, 1004),
    (100, 1, 64, 47),
    (50, 1, 16, 0),
])
def test_nofile_advice_says_where_a_worker_stops(max_connections, workers, limit, usable):
    advice = nofile_advice(max_connections, workers, limit)
    assert advice is not None
    assert f"max_connections {max_connections} exceeds the descriptor limit {limit}" in advice
    assert f"stops accepting at about {usable} connections" in advice
    assert "pauses accepting for 0.5s" in advice


@pytest.mark.parametrize(("max_connections", "workers", "limit"), [
    (1000, 4, 1024),
    (1004, 4, 1024),
    (10, 64, 1024),
    (10**9, 2, resource.RLIM_INFINITY),
])
def test_nofile_advice_is_silent_when_the_limit_allows(max_connections, workers, limit):
    assert nofile_advice(max_connections, workers, limit) is None


def test_nofile_advice_reads_this_process_limit():
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert nofile_advice(1, 1) is None
    if soft != resource.RLIM_INFINITY:
        assert nofile_advice(soft, 1) is not None


def collect_answers(clients: list[socket.socket], seconds: float) -> set[socket.socket]:
    """The clients whose answer arrives within `seconds`."""
    answered: set[socket.socket] = set()
    received = {c: b"" for c in clients}
    with selectors.DefaultSelector() as sel:
        for c in clients:
            sel.register(c, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and len(answered) < len(clients):
            for key, _ in sel.select(left):
                c = key.fileobj
                chunk = c.recv(4096)  # type: ignore[union-attr]
                assert chunk, "a client was closed without its answer"
                received[c] += chunk  # type: ignore[index]
                if received[c].endswith(b"."):  # type: ignore[index]
                    assert received[c] == NAME_A  # type: ignore[index]
                    answered.add(c)  # type: ignore[arg-type]
                    sel.unregister(c)
    return answered


def test_descriptor_exhaustion_pauses_accepting_and_logs_once_per_episode(start_daemon):
    d = start_daemon(workers=1)
    worker = d.workers()[0]
    assert d.ask(NAME_Q) == NAME_A
    resource.prlimit(worker.pid, resource.RLIMIT_NOFILE, (64, 64))
    clients = []
    try:
        for _ in range(150):  # the kernel completes every handshake (backlog 4096)
            sock = socket.create_connection(("127.0.0.1", d.port), timeout=5)
            sock.sendall(NAME_Q)
            clients.append(sock)
        cpu = worker.cpu_times()
        answered = collect_answers(clients, 2.0)  # the observation window
        spent = sum(worker.cpu_times()[:2]) - sum(cpu[:2])
        assert spent < 0.5, f"the worker spins at the descriptor limit: {spent:.2f}s CPU in 2s"
        assert 30 <= len(answered) < 64, len(answered)  # those that got in are served
        log = d.log()
        assert len(re.findall(r"descriptor limit reached \(EMFILE\)", log)) == 1, log[-3000:]
        assert "accept failed" not in log
        # The clients leave in turns: those queued are accepted and served as descriptors free up.
        waiting = [c for c in clients if c not in answered]
        for c in answered:
            c.close()
        while waiting:
            answered = collect_answers(waiting, 5.0)
            assert answered, f"{len(waiting)} clients left unserved"
            for c in answered:
                c.close()
            waiting = [c for c in waiting if c not in answered]
    finally:
        for c in clients:
            c.close()
    match = re.search(r"accepting again after (\d+) failed accept attempts in ([\d.]+)s",
                      wait_for(lambda: "accepting again" in d.log() and d.log(), 5, "the end of the episode"))
    assert match and int(match.group(1)) >= 1
    assert d.ask(NAME_Q) == NAME_A  # new clients are served again
    log = d.log()
    # A slow turn of this test (> 1 s between two turns) may split the episode in two.
    assert 1 <= len(re.findall(r"descriptor limit reached", log)) <= 3, log[-3000:]
    assert len(log.splitlines()) < 30, f"{len(log.splitlines())} log lines"
    assert [p.pid for p in d.workers()] == [worker.pid]


# =================================================================================
# C. A log file that cannot be reopened does not end a worker
# =================================================================================

def test_usr1_with_an_unopenable_log_file_keeps_the_workers_serving(start_daemon, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "served.log"
    d = start_daemon("--log-file", str(path), "-w", "2", wait=False)
    ready_from(d, path, 2)
    assert d.ask(NAME_Q) == NAME_A
    pids = sorted(p.pid for p in d.workers())

    moved = tmp_path / "logs.old"
    logs.rename(moved)  # the open log file lives on as moved/served.log
    logs.write_text("not a directory\n")  # root ignores permissions: a file is in the way instead
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)  # the workers (the master's USR1 is the master's business)
    errors = wait_log(moved / "served.log",
                      r"\[(\d+)\] worker \d: cannot reopen log file .*: Not a directory", count=2)
    assert sorted(int(m.group(1)) for m in errors) == pids
    for _ in range(4):
        assert d.ask(NAME_Q) == NAME_A
    assert sorted(p.pid for p in d.workers()) == pids
    assert "Traceback" not in read(moved / "served.log")

    logs.unlink()  # the way is clear again: the next USR1 reopens
    logs.mkdir()
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    wait_log(path, r"worker \d: log file reopened", count=2)
    assert sorted(p.pid for p in d.workers()) == pids


