"""Processes: the daemon's pool as `ps` shows it, and the reaping of every process a test starts.

The whole test session is a child subreaper (conftest): an orphan of our subtree (a USR2
successor, a `--daemon` master, the workers of a SIGKILLed master) becomes our child, not
PID 1's, so `reap_strays` can kill and reap whatever a test left behind.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .timing import scaled, wait_for

WORKER_TITLE = re.compile(r"^lancelotd: worker (\d+) \[gen (\d+)\]")


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


# The system calls a test may wait for a process to sleep in, by their numbers on this machine.
SLEEP_CALLS = {
    "x86_64": {"epoll_wait": (232, 281, 441), "nanosleep": (35, 230)},  # epoll_(p)wait(2), clock_
    "aarch64": {"epoll_wait": (22, 441), "nanosleep": (101, 115)},
}


def sleeping_in(pid: int, call: str) -> bool:
    """True while process `pid` sleeps in system call `call` ("epoll_wait" or "nanosleep").

    The kernel's wait channel names the function where kernel symbols are shown; where they
    are hidden, wchan reads "0" and /proc/PID/syscall gives the call's number instead.  A test
    that can read neither is skipped with the reason (it would otherwise time out).
    """
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
    except OSError:
        return False  # gone
    if wchan not in ("", "0"):
        return call in wchan
    return syscall_is(pid, call)


def syscall_is(pid: int, call: str) -> bool:
    """sleeping_in's way where wchan hides kernel symbols: the call's number, or a skip."""
    numbers = SLEEP_CALLS.get(os.uname().machine, {}).get(call)
    if numbers is None:
        pytest.skip(f"/proc/PID/wchan hides kernel symbols and {call}'s numbers on "
                    f"{os.uname().machine} are not known to tests/helpers.py")
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except PermissionError:
        pytest.skip("/proc/PID/wchan hides kernel symbols and /proc/PID/syscall is not ours to read")
    except OSError:
        return False  # gone
    return bool(fields) and fields[0].isdigit() and int(fields[0]) in numbers


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


# --- every process a test starts is reaped --------------------------------------------

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

Key = tuple[int, float]  # (pid, start time): a reused PID is another process


def become_subreaper() -> None:
    """Orphans of our subtree are reparented to this process (Linux), so we can reap them."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def descendants() -> dict[Key, psutil.Process]:
    """Every process below this one, zombies included."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            found[(proc.pid, proc.create_time())] = proc
        except psutil.Error:
            pass
    return found


def strays(before: set[Key]) -> list[psutil.Process]:
    """Descendants started since `before` was taken that no earlier process owns.

    A process below one that was already there (the systemd sandbox a module boots, and
    the services it starts) lives by its owner's rules, not by this test's.
    """
    procs = descendants()
    by_pid = {key[0]: key for key in procs}
    me, found = os.getpid(), []
    for key, proc in procs.items():
        if key in before:
            continue
        try:
            parent = proc.ppid()
        except psutil.Error:
            continue
        owned = False
        while parent != me:  # walk up: is an ancestor older than the test?
            parent_key = by_pid.get(parent)
            if parent_key is None:
                break  # the parent just exited: the process is ours now
            if parent_key in before:
                owned = True
                break
            try:
                parent = procs[parent_key].ppid()
            except psutil.Error:
                break
        if not owned:
            found.append(proc)
    return found


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} ({proc.status()}) {title(proc) or proc.name()!r}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


def reap_strays(before: set[Key], timeout: float = 10.0) -> list[str]:
    """Kill what was left running since `before`, reap every zombie child; what was running."""
    leaked: dict[int, str] = {}
    deadline = time.monotonic() + scaled(timeout)
    while left := strays(before):
        for proc in left:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    leaked.setdefault(proc.pid, describe(proc))
                    proc.kill()
                elif proc.ppid() == os.getpid():
                    os.waitpid(proc.pid, os.WNOHANG)
            except (psutil.Error, ChildProcessError):
                pass
        if time.monotonic() > deadline:
            leaked.update({p.pid: describe(p) + " NOT REAPED" for p in left})
            break
        time.sleep(0.01)
    return list(leaked.values())


def reap_group(pgid: int, timeout: float = 10.0) -> None:
    """Wait until no process of group `pgid` is left below us; reap those that became our children."""
    def group_gone() -> bool:
        left = False
        for proc in psutil.Process().children(recursive=True):
            try:
                if os.getpgid(proc.pid) != pgid:
                    continue
                left = True
                if proc.ppid() == os.getpid():
                    os.waitpid(proc.pid, os.WNOHANG)
            except (OSError, psutil.Error):
                pass
        return not left
    wait_for(group_gone, timeout, f"the processes of group {pgid} to be reaped")
