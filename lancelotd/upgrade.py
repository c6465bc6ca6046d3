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
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

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
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    fds = {sock.fileno(): address for address, sock in listeners.items()}
    env = dict(os.environ)
    env[ENV_INHERIT] = ",".join(f"{fd}={address}" for fd, address in fds.items())
    env[ENV_READY_FD] = str(ready_w)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        if os.fork() == 0:
            _launcher(argv, cwd, env, [*fds, ready_w], ready_w, blocked)
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
