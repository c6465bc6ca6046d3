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
import signal
from pathlib import Path

from conftest import LISTENING, Daemon, wait_for

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


