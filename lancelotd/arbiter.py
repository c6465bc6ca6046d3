"""The master: binds, forks workers, supervises them, and owns every signal.

Shape after gunicorn's arbiter and nginx's master loop: signal handlers only
record the signal (through the wakeup pipe), and the main loop reads the
recorded signals and dispatches them to handle_<name>().  All real work -
logging, reaping, forking - happens in the loop, never inside a handler.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import time
from dataclasses import dataclass

from setproctitle import setproctitle

from . import pidfile
from .config import Config
from .logs import log
from .sockets import BindError, bind_all, format_address
from .worker import run_worker

# The signal table: every signal the master acts on, and its handler.
SIGNALS = {
    signal.SIGTERM: "term",  # graceful stop
    signal.SIGINT: "int",  # fast stop
    signal.SIGQUIT: "quit",  # fast stop
    signal.SIGCHLD: "chld",  # a worker exited: reap it
}
BOOT_GRACE = 1.0  # a worker that dies younger than this failed to boot
MAX_BACKOFF = 30.0
KILL_GRACE = 1.0  # how long a fast stop waits before SIGKILL


class StartError(Exception):
    """The master cannot start; the message says why in one line."""


@dataclass
class WorkerProc:
    pid: int
    number: int
    generation: int
    started: float


class Arbiter:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.pid = os.getpid()
        self.listeners: list[socket.socket] = []
        self.workers: dict[int, WorkerProc] = {}
        self.generation = 1
        self.boot_failures = 0
        self.next_spawn = 0.0  # back-off: no spawn before this time
        self.stopping: str | None = None  # None, "graceful" or "fast"
        self.stop_deadline = 0.0
        self.pid_file_written = False

    # --- start ---------------------------------------------------------

    def start(self) -> None:
        """Everything that can fail at start, before any worker exists."""
        raise_nofile_limit()
        try:
            if self.cfg.pid_file:
                pidfile.claim(self.cfg.pid_file)
            self.listeners = bind_all(self.cfg.bind, self.cfg.backlog)
        except (pidfile.AlreadyRunning, BindError) as e:
            raise StartError(str(e)) from None
        except OSError as e:
            raise StartError(f"cannot use PID file {self.cfg.pid_file}: {e.strerror}") from None
        for sock in self.listeners:
            log.info("listening on %s", format_address(sock.getsockname()))
        self._install_signals()
        if self.cfg.pid_file:
            try:
                pidfile.write(self.cfg.pid_file, self.pid)
            except OSError as e:
                for sock in self.listeners:
                    sock.close()
                raise StartError(f"cannot write PID file {self.cfg.pid_file}: {e.strerror}") from None
            self.pid_file_written = True
        setproctitle(f"lancelotd: master [{self.cfg.path or 'built-in defaults'}]")
        log.info("master started: %d workers, config %s",
                 self.cfg.workers, self.cfg.path or "built-in defaults")

    def _install_signals(self) -> None:
        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.sig_w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            # The handler does nothing: the C-level handler has already written
            # the signal number into the wakeup pipe, which is our queue.
            signal.signal(sig, _record_only)

    # --- the loop ------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the exit code."""
        try:
            self.spawn_missing()
            while True:
                for signum in self.wait_for_signals():
                    getattr(self, "handle_" + SIGNALS[signum])()
                self.reap()
                if self.stopping:
                    if self.stop_step():
                        return 0
                else:
                    self.spawn_missing()
        finally:
            self.cleanup()

    def wait_for_signals(self) -> list[int]:
        timeout = 0.1 if self.stopping or self.missing() else 1.0
        try:
            select.select([self.sig_r], [], [], timeout)
            data = os.read(self.sig_r, 4096)
        except BlockingIOError:
            return []
        return [signum for signum in data if signum in SIGNALS]

    # --- signal handlers (called from the loop, not from the signal) -------

    def handle_chld(self) -> None:
        pass  # reap() runs after every wake-up anyway

    def handle_term(self) -> None:
        self.begin_stop("graceful", signal.SIGTERM, self.cfg.graceful_timeout + KILL_GRACE)

    def handle_int(self) -> None:
        self.begin_stop("fast", signal.SIGQUIT, KILL_GRACE)

    handle_quit = handle_int

    # --- workers -------------------------------------------------------

    def missing(self) -> list[int]:
        """Worker numbers (1..workers) that no live worker holds."""
        taken = {w.number for w in self.workers.values()}
        return [n for n in range(1, self.cfg.workers + 1) if n not in taken]

    def spawn_missing(self) -> None:
        for number in self.missing():
            if time.monotonic() < self.next_spawn:
                return
            self.spawn(number)

    def spawn(self, number: int) -> None:
        # Block our signals across fork so a signal cannot reach the child
        # while it still has the master's handlers and wakeup pipe.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                run_worker(number, self.generation, self.listeners, self.cfg, self.pid, self._child_cleanup)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.workers[pid] = WorkerProc(pid, number, self.generation, time.monotonic())
        log.info("spawned worker %d (pid %d, gen %d)", number, pid, self.generation)

    def _child_cleanup(self) -> None:
        """In a new worker: drop the master's signal plumbing."""
        signal.set_wakeup_fd(-1)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self.sig_r)
        os.close(self.sig_w)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self.worker_exited(worker, status)

    def worker_exited(self, worker: WorkerProc, status: int) -> None:
        how = describe_status(status)
        if self.stopping:
            log.info("worker %d (pid %d) %s", worker.number, worker.pid, how)
            return
        log.warning("worker %d (pid %d) %s unexpectedly: replacing it", worker.number, worker.pid, how)
        now = time.monotonic()
        if now - worker.started < BOOT_GRACE:
            self.boot_failures += 1
            delay = min(0.1 * 2 ** self.boot_failures, MAX_BACKOFF)
            self.next_spawn = now + delay
            log.error("worker %d died during boot (%d in a row): next spawn in %.1fs",
                      worker.number, self.boot_failures, delay)
        else:
            self.boot_failures = 0

    def signal_workers(self, signum: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    # --- stopping ------------------------------------------------------

    def begin_stop(self, how: str, worker_signal: int, grace: float) -> None:
        if self.stopping == "fast" or self.stopping == how:
            return
        log.info("%s stop: signalling %d workers", how, len(self.workers))
        self.stopping = how
        self.stop_deadline = time.monotonic() + grace
        self.signal_workers(worker_signal)

    def stop_step(self) -> bool:
        """One loop turn of a stop; True once every worker is gone."""
        if not self.workers:
            return True
        if time.monotonic() >= self.stop_deadline:
            log.warning("%d workers still running after the stop timeout: killing them", len(self.workers))
            self.signal_workers(signal.SIGKILL)
            self.stop_deadline = float("inf")
        return False

    def cleanup(self) -> None:
        if self.workers:  # an exception in the loop: leave no orphan behind
            self.signal_workers(signal.SIGKILL)
            for pid in list(self.workers):
                _waitpid_quietly(pid)
        for sock in self.listeners:
            sock.close()
        if self.pid_file_written:
            pidfile.remove(self.cfg.pid_file, self.pid)
        log.info("master stopped")


def _record_only(signum: int, frame: object) -> None:
    """The wakeup pipe already holds the signal number; nothing else to do."""


def _waitpid_quietly(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: each connection is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard,
                        getattr(e, "strerror", e) or e)

