"""A `lancelotd serve` process tree started by a test, its log, and its readiness.

Every daemon runs in its own session (process group), so teardown can kill and reap the master
and every worker it forked, even when a test fails.  Readiness is the PID file (written once the
sockets are bound) and the "listening on" log line that gives the ephemeral port; no fixed sleeps.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from .procs import reap_group, wait_pool
from .talk import recv_until
from .timing import scaled, wait_for

LISTENING = re.compile(r"listening on (\S+):(\d+)$", re.M)


class Daemon:
    """One `lancelotd serve` process tree started by a test."""

    def __init__(self, tmp: Path, args: list[str], config: str | None, env: dict[str, str] | None,
                 default_bind: bool = True) -> None:
        self.tmp = tmp
        self.pid_file = tmp / "lancelotd.pid"
        self.log_file = tmp / "lancelotd.log"
        self.config_file = tmp / "lancelotd.toml"
        cmd = [sys.executable, "-m", "lancelotd", "serve", "--pid-file", str(self.pid_file)]
        if config is not None:
            self.config_file.write_text(config)
            cmd += ["-c", str(self.config_file)]
        if default_bind and not any(a in ("-b", "--bind") for a in args):
            cmd += ["-b", "127.0.0.1:0"]
        self.cmd = cmd + args
        self.stderr = open(self.log_file, "ab")
        full_env = dict(os.environ, **(env or {}))
        full_env.pop("LANCELOTD_CONFIG", None)
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr,
            start_new_session=True, env=full_env,
        )
        self.port = 0

    # --- readiness ------------------------------------------------------

    def wait_ready(self, timeout: float = 10.0, workers: int | None = None) -> Daemon:
        """Wait for the PID file; then learn the port; then (optionally) N workers."""
        def pid_file_or_exit() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"lancelotd exited with {self.proc.returncode}:\n{self.log()}")
            try:  # a stale file from an earlier process does not count
                return int(self.pid_file.read_text()) == self.proc.pid
            except (OSError, ValueError):
                return False
        wait_for(pid_file_or_exit, timeout, "the PID file")
        match = LISTENING.search(self.log())
        assert match, self.log()
        self.port = int(match.group(2))
        if workers is not None:
            self.wait_workers(workers, timeout)
        return self

    def wait_workers(self, count: int, timeout: float = 10.0) -> list[psutil.Process]:
        def exactly_count() -> list[psutil.Process] | None:
            workers = self.workers()
            return workers if len(workers) == count else None
        return wait_for(exactly_count, timeout, f"{count} workers")  # type: ignore[return-value]

    def workers(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        alive = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
            except psutil.NoSuchProcess:
                pass
        return alive

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    # --- talking ----------------------------------------------------------

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=scaled(timeout))
        return sock

    def ask(self, question: bytes | str, timeout: float = 5.0) -> bytes:
        """One question on a new connection; the answer up to its '.'."""
        if isinstance(question, str):
            question = question.encode()
        with self.connect(timeout) as sock:
            sock.sendall(question)
            return recv_until(sock, b".")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(scaled(timeout))

    def kill_all(self) -> None:
        """Teardown: SIGKILL the whole process group, reap the master and its orphaned workers."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(scaled(10))
            reap_group(self.proc.pid)
        except (subprocess.TimeoutExpired, AssertionError):
            pass  # no_leaked_processes names what is left
        self.stderr.close()


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
