"""USR2 binary upgrade: starting a successor master that inherits our sockets.

The old master forks a short-lived launcher, which forks and execs the same
command line and exits at once: orphaned at birth, the new master is adopted
by init - under systemd by systemd itself, which then supervises it as its
own child once MAINPID= names it (a main process it did not adopt is one
whose stop it does not wait for).

The listening sockets pass as inherited descriptors named in
LANCELOTD_INHERIT_FDS ("fd=address,..."), keyed by the configured address so
the new master reuses exactly the sockets its config still asks for.  Over
the ready pipe (LANCELOTD_READY_FD) the old master hears "pid N" from the
launcher, then "ready" or "error REASON" from the new master; --daemon's
launcher uses the same pipe.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import pidfile
from .config import Config
from .logs import log
from .supervision import KILL_GRACE, kill

if TYPE_CHECKING:
    from .arbiter import Arbiter

UPGRADE_TIMEOUT = 30.0  # a new master not ready by then is abandoned
ENV_INHERIT = "LANCELOTD_INHERIT_FDS"
ENV_READY_FD = "LANCELOTD_READY_FD"


@dataclass
class Upgrade:
    """A successor on its way, as the old master sees it."""

    ready_r: int
    pid: int = 0  # the new master's, once the launcher has said it
    news: bytes = b""
    started: float = field(default_factory=time.monotonic)

    def read_news(self) -> list[tuple[str, str]]:
        """The lines that arrived, as (word, rest); ("eof", "") once nobody can write."""
        try:
            data = os.read(self.ready_r, 4096)
        except OSError:
            data = b""
        if not data:
            return [("eof", "")]
        self.news += data
        lines = []
        while b"\n" in self.news:
            line, _, self.news = self.news.partition(b"\n")
            word, _, rest = line.decode("utf-8", "replace").partition(" ")
            if word == "pid" and rest.isdigit():
                self.pid = int(rest)
            lines.append((word, rest))
        return lines


def launch_successor(argv: list[str], cwd: str, listeners: dict[str, socket.socket],
                     blocked: Iterable[int]) -> Upgrade:
    """Start `argv` as a new master that inherits `listeners`; returns what to watch.

    `blocked` are the signals the master handles: they stay blocked across
    the forks, so none reaches a child that still has the master's handlers.
    """
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)  # OSError (EMFILE...) goes to the caller
    fds = {sock.fileno(): address for address, sock in listeners.items()}
    env = dict(os.environ)
    env[ENV_INHERIT] = ",".join(f"{fd}={address}" for fd, address in fds.items())
    env[ENV_READY_FD] = str(ready_w)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        if os.fork() == 0:
            _launcher(argv, cwd, env, [*fds, ready_w], ready_w, blocked)
    except OSError:
        os.close(ready_r)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(ready_w)
    return Upgrade(ready_r)


def _launcher(argv: list[str], cwd: str, env: dict[str, str], fds: list[int], ready_w: int,
              blocked: Iterable[int]) -> None:
    """In the short-lived child: fork and exec the new master, report its PID, exit."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in blocked:
            signal.signal(sig, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            try:
                for fd in fds:
                    os.set_inheritable(fd, True)
                os.chdir(cwd)
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                os.execve(argv[0], argv, env)
            except OSError as e:
                os.write(ready_w, f"error cannot start {argv[0]}: {e.strerror}\n".encode())
            finally:
                os._exit(1)
        os.write(ready_w, f"pid {pid}\n".encode())
    finally:
        os._exit(0)


def inherited_listeners() -> dict[str, socket.socket]:
    """In the new master: the sockets the old one handed us, by the address they were bound for."""
    spec = os.environ.pop(ENV_INHERIT, "")
    inherited = {}
    for item in filter(None, spec.split(",")):
        fd, _, address = item.partition("=")
        sock = socket.socket(fileno=int(fd))
        sock.set_inheritable(False)
        inherited[address] = sock
    return inherited


class Upgrades:
    """The upgrade half of the Arbiter (a mixin: it works on the master's own state).

    Either the new master reports "ready" and this one retires, or nothing
    changes: the PID file is restored, the metrics port is bound again and
    this master keeps serving.
    """

    def start_upgrade(self: Arbiter) -> None:
        """Re-exec our command line as a new master that inherits the sockets."""
        pid_file = self.cfg.pid_file
        oldbin = pid_file + ".oldbin"
        if pid_file and pidfile.master_process(oldbin) is not None:
            # Our own predecessor is still draining: its .oldbin must not be lost.
            log.warning("USR2 ignored: the previous master (%s) is still draining", pidfile.read(oldbin))
            return
        argv = [sys.executable, *sys.orig_argv[1:]]
        try:
            if pid_file and os.path.exists(pid_file):
                os.replace(pid_file, oldbin)  # the new master writes its own
        except OSError as e:
            log.error("USR2 refused: cannot rename the PID file to %s: %s", oldbin, e.strerror)
            return
        self.move_metrics(Config(metrics_bind=""))  # the new master binds it again
        try:
            self.upgrade = launch_successor(argv, self.cwd, self.listeners, self.signal_table())
        except OSError as e:
            self.restore_pid_file()
            self.move_metrics(self.cfg)
            log.error("USR2 refused: cannot start a new master: %s", e.strerror)
            return
        self.set_title(" (old, upgrading)")
        log.info("upgrade: starting a new master: %s", " ".join(argv))

    def upgrade_answered(self: Arbiter) -> None:
        """Read the new master's news: its PID, then "ready" or an error."""
        upgrade = self.upgrade
        assert upgrade is not None
        for word, rest in upgrade.read_news():
            if word == "pid":
                log.info("upgrade: new master %d started", upgrade.pid)
            elif word == "eof":
                self.upgrade_failed(f"the new master {upgrade.pid or ''} exited before it was ready")
                return
            elif word == "ready":
                self.upgrade_succeeded(upgrade)
                return
            elif word == "error":
                self.upgrade_failed(f"the new master failed: {rest}")
                return

    def upgrade_succeeded(self: Arbiter, upgrade: Upgrade) -> None:
        os.close(upgrade.ready_r)
        self.upgrade = None
        log.info("upgrade: new master %s is ready; retiring our workers", upgrade.pid)
        if upgrade.pid:  # systemd follows the new master as the service's main process
            self.notifier.main_pid(upgrade.pid)
        self.begin_stop("upgraded", signal.SIGUSR2, self.cfg.graceful_timeout + KILL_GRACE)
        self.set_title(" (old)")

    def check_upgrade(self: Arbiter) -> None:
        if self.upgrade and time.monotonic() - self.upgrade.started > UPGRADE_TIMEOUT:
            self.abandon_upgrade(f"the new master was not ready within {UPGRADE_TIMEOUT:.0f}s")

    def abandon_upgrade(self: Arbiter, why: str) -> None:
        """Stop a new master that is not ready yet, and keep serving."""
        if self.upgrade and self.upgrade.pid:
            kill(self.upgrade.pid, signal.SIGTERM)
        self.upgrade_failed(why)

    def upgrade_failed(self: Arbiter, why: str) -> None:
        upgrade = self.upgrade
        assert upgrade is not None
        self.upgrade = None
        os.close(upgrade.ready_r)
        self.restore_pid_file()
        self.move_metrics(self.cfg)
        self.set_title()
        log.error("upgrade failed: %s; this master keeps serving", why)
        self.run_queued_reload()

    def restore_pid_file(self: Arbiter) -> None:
        pid_file = self.cfg.pid_file
        if pid_file and pidfile.read(pid_file + ".oldbin") == self.pid:
            try:
                os.replace(pid_file + ".oldbin", pid_file)
            except OSError as e:
                log.error("cannot restore the PID file %s from %s.oldbin: %s", pid_file, pid_file, e.strerror)
