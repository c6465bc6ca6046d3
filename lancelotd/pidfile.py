"""The PID file: its presence means "a lancelotd master is listening" (docs/PROMISES.md §3).

The file holds the master's PID and nothing else, so `kill $(cat FILE)`,
systemd's PIDFile= and monit read it as they are.  It is written atomically
(temporary file + rename) once the sockets are bound, and removed at exit.

Staleness.  A file left behind by a dead process, or naming a PID the kernel
has since given to another process, never blocks a start; a live master is
never taken for a stale one.  Wall-clock times cannot decide this: NTP at
boot or a VM resume steps the clock, and a process's start time as psutil
gives it (boot time + ticks) moves with the step while the file's mtime does
not, so a live master looked younger than its own PID file.  Instead, beside
the PID file the master leaves a start record, `lancelotd-master-PID.start`:
"PID BOOT_ID STARTTIME", the kernel's boot id and the process's start time
in clock ticks since boot (/proc/PID/stat field 22).  Both are fixed for the
life of a process and no clock step changes them, and together they name one
process: a PID reused since, or a file from an earlier boot, does not match.
The record is keyed by PID, not by the PID file's name, so it still holds
when an upgrade (USR2) renames the PID file to PIDFILE.oldbin.

The rule, for the process P that the file names:
- P is not alive: stale;
- there is a start record for P: live if it matches P exactly, else stale
  (the PID was reused);
- there is none (a master of a version that wrote none): live if P's title is
  a lancelotd master's, else stale.  With no trustworthy time there is
  nothing better, and a live master's file must never be unlinked.
"""

from __future__ import annotations

import errno
import os

import psutil

from . import runtime
from .logs import log

TITLE_PREFIX = "lancelotd: master"
BOOT_ID = "/proc/sys/kernel/random/boot_id"


class AlreadyRunning(Exception):
    def __init__(self, path: str, pid: int) -> None:
        super().__init__(f"lancelotd is already running as PID {pid} (PID file {path})")
        self.pid = pid


def read(path: str) -> int | None:
    """The PID in the file, or None when there is no file or it holds no PID."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.readline().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def record_path(path: str, pid: int) -> str:
    """The start record of master `pid`, in the PID file's directory."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f"lancelotd-master-{pid}.start")


def identity(pid: int) -> str | None:
    """'PID BOOT_ID STARTTIME' of a live process: the same for its whole life, never for another."""
    try:
        with open(BOOT_ID, encoding="ascii") as f:
            boot_id = f.read().strip()
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()  # the name in (...) may hold spaces
        return f"{pid} {boot_id} {fields[19]}"  # field 22: starttime, in ticks since boot
    except (OSError, IndexError):
        return None


def recorded_identity(path: str, pid: int) -> str | None:
    try:
        with open(record_path(path, pid), encoding="ascii") as f:
            return f.readline().strip()
    except (OSError, UnicodeDecodeError):
        return None


def master_process(path: str) -> psutil.Process | None:
    """The live lancelotd master the PID file names, or None if the file is stale (rule above)."""
    pid = read(path)
    if pid is None or pid == os.getpid():
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        recorded = recorded_identity(path, pid)
        if recorded is not None:
            return proc if recorded == identity(pid) else None
        return proc if " ".join(proc.cmdline()).startswith(TITLE_PREFIX) else None
    except (OSError, psutil.Error):
        return None


def claim(path: str) -> None:
    """Make the PID file's directory safe to use; refuse to start over a live master.

    Raises runtime.RuntimeDirError (an OSError) when the directory cannot be
    made or is not ours alone, AlreadyRunning when a live master owns the file.
    A stale file is removed with a log line.
    """
    runtime.ensure_directory(os.path.dirname(os.path.abspath(path)))
    proc = master_process(path)
    if proc is not None:
        raise AlreadyRunning(path, proc.pid)
    pid = read(path)
    if os.path.exists(path):
        log.warning("removing stale PID file %s (PID %s is not a running lancelotd)", path, pid)
        os.unlink(path)
        if pid is not None:
            _unlink_quietly(record_path(path, pid))


def write(path: str, pid: int) -> None:
    """Write the start record, then the PID file (each atomically): a reader never sees one without the other.

    `pid` must be the calling process, whose identity the record holds.
    """
    own = identity(pid)
    if own is None:
        raise OSError(errno.ENOENT, f"cannot read the start time of process {pid} from /proc")
    _write_atomically(record_path(path, pid), f"{own}\n", pid)
    _write_atomically(path, f"{pid}\n", pid)


def _write_atomically(path: str, text: str, pid: int) -> None:
    tmp = f"{path}.{pid}.tmp"
    fd = runtime.open_new_file(tmp, os.O_WRONLY, 0o644)
    try:
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
        os.fchmod(fd, 0o644)  # readable by `lancelotd status` as any user, whatever the umask
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove(path: str, pid: int) -> None:
    """Remove the file and its start record if the file is still ours (an upgrade may have handed it on)."""
    if read(path) == pid:
        _unlink_quietly(path)
        _unlink_quietly(record_path(path, pid))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
