"""Starting a USR2 successor: the launcher, the inherited sockets, the masters' socketpair.

The old master forks a short-lived launcher, which forks and execs the same
command line and exits at once: orphaned at birth, the new master is adopted
by init (or systemd).  upgrade.py runs the hand-over over the Channel made here.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Iterable

ENV_INHERIT = "LANCELOTD_INHERIT_FDS"
ENV_READY_FD = "LANCELOTD_READY_FD"
ENV_PREDECESSOR = "LANCELOTD_UPGRADE_FROM"  # the old master's PID, in the new master


class Channel:
    """One end of the masters' socketpair: lines out, lines in."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.news = b""

    def read(self) -> list[tuple[str, str]]:
        """The lines that arrived, as (word, rest); ("eof", "") once the other side is gone."""
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            return [("eof", "")]
        self.news += data
        lines = []
        while b"\n" in self.news:
            line, _, self.news = self.news.partition(b"\n")
            word, _, rest = line.decode("utf-8", "replace").partition(" ")
            lines.append((word, rest))
        return lines

    def say(self, line: str) -> bool:
        """Send one line; False when the other side is gone."""
        try:
            os.write(self.fd, (line + "\n").encode("utf-8", "replace"))
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def launch_successor(argv: list[str], cwd: str, listeners: dict[str, socket.socket],
                     blocked: Iterable[int]) -> Channel:
    """Start `argv` as a new master that inherits `listeners`; returns the channel to it.

    `blocked` are the signals the master handles: they stay blocked across
    the forks, so none reaches a child that still has the master's handlers.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)  # OSError goes to the caller
    ready_r, ready_w = ours.detach(), theirs.detach()
    os.set_blocking(ready_r, False)
    fds = {sock.fileno(): address for address, sock in listeners.items()}
    env = dict(os.environ)
    env[ENV_INHERIT] = ",".join(f"{fd}={address}" for fd, address in fds.items())
    env[ENV_READY_FD] = str(ready_w)
    env[ENV_PREDECESSOR] = str(os.getpid())
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
    return Channel(ready_r)


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
                if fault("exec"):
                    raise OSError(errno.ENOEXEC, os.strerror(errno.ENOEXEC))
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


def fault(name: str) -> bool:
    """Fault injection for the upgrade tests: LANCELOTD_TEST_UPGRADE_FAULT names the fault, or
    LANCELOTD_TEST_UPGRADE_FAULT_FILE names a file that does (read at each check, so a soak test
    can break one upgrade in ten and let the others through)."""
    if os.environ.get("LANCELOTD_TEST_UPGRADE_FAULT") == name:
        return True
    path = os.environ.get("LANCELOTD_TEST_UPGRADE_FAULT_FILE")
    if not path:
        return False
    try:
        with open(path) as f:
            return f.read().strip() == name
    except OSError:
        return False
