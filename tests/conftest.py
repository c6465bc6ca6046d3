"""Harness for integration tests: real lancelotd processes on loopback.

Every daemon runs in its own session (process group), so teardown can kill
and reap the master and every worker it forked, even when a test fails.
Readiness is the PID file (written once the sockets are bound) and the
"listening on" log line that gives the ephemeral port; no fixed sleeps.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

LISTENING = re.compile(r"listening on (\S+):(\d+)$", re.M)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


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
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
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
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        """Teardown: SIGKILL the whole process group and reap the master."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.stderr.close()


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


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start_daemon(*args, config=TOML, wait=True, workers=N) -> a ready Daemon.

    Unless args hold -b, the daemon listens on 127.0.0.1:0 through `-b`, which
    a reload keeps; pass default_bind=False to let the config's [server] bind rule.
    """
    started: list[Daemon] = []

    def start(*args: str, config: str | None = None, wait: bool = True, workers: int | None = None,
              env: dict[str, str] | None = None, subdir: str | None = None,
              default_bind: bool = True) -> Daemon:
        tmp = tmp_path / (subdir or f"d{len(started)}")
        tmp.mkdir(exist_ok=True)
        extra = list(args)
        if workers is not None and "-w" not in extra:
            extra += ["-w", str(workers)]
        daemon = Daemon(tmp, extra, config, env, default_bind)
        started.append(daemon)
        if wait:
            daemon.wait_ready(workers=workers)
        return daemon

    yield start
    for daemon in started:
        daemon.kill_all()
