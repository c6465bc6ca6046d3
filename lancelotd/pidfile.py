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

The rule, for the process P that the file names: P is a live lancelotd master
only with every proof, never on the word of one of them:
- P is alive and not a zombie;
- P's title is a lancelotd master's (the master sets it before it writes the file);
- P's real and effective uid are the PID file's owner: a file the service
  user wrote names a process of the service user, and root's process only
  when the file is root's;
- where there is a start record for P (owned by the PID file's owner), it
  matches P exactly (else the PID was reused).
The file itself, and the record, are read through trust.py: never through a
link, never a FIFO, only regular files owned by root or the directory's
owner, in a directory that passes the runtime directory's rules.  So root's
`stop`, `reload`, `reopen-logs` and `status` signal or show a process only
when all of it holds, and say which proof failed.
"""

from __future__ import annotations

import errno
import os

import psutil

from . import runtime, trust
from .logs import log

TITLE_PREFIX = "lancelotd: master"
# examine()'s answers that make a PID file stale (anything else is a refusal)
GONE = "which is not running"
NOT_OURS = "which is not lancelotd"
REUSED = "which is not the process its start record names (the PID was reused)"
STALE = (GONE, NOT_OURS, REUSED)
BOOT_ID = "/proc/sys/kernel/random/boot_id"


class AlreadyRunning(Exception):
    def __init__(self, path: str, pid: int) -> None:
        super().__init__(f"lancelotd is already running as PID {pid} (PID file {path})")
        self.pid = pid


def read(path: str) -> int | None:
    """The PID in the file, or None when there is none, it holds no PID, or it is refused (trust.py)."""
    try:
        return read_owned(path)[0]
    except (FileNotFoundError, trust.Untrusted):
        return None


def read_owned(path: str) -> tuple[int | None, int]:
    """(the PID in the file or None, the file's owner), read through trust.py.

    FileNotFoundError when there is no file (or no directory), PermissionError
    when we may not look, trust.Untrusted when what is there is refused.
    """
    directory = trust.open_directory(os.path.dirname(os.path.abspath(path)))
    with directory:
        name = os.path.basename(path)
        fd = directory.open_file(name)
        try:
            owner = os.fstat(fd).st_uid
            text = os.read(fd, 64).decode("ascii", "replace").split("\n")[0].strip()
        finally:
            os.close(fd)
    return (int(text) if text.isdigit() and int(text) > 0 else None), owner


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


def recorded_identity(path: str, pid: int, owner: int) -> str | None:
    """The start record of `pid`, if there is one its PID file's owner wrote (else None)."""
    record = record_path(path, pid)
    try:
        with trust.open_directory(os.path.dirname(record)) as directory:
            text = directory.read(os.path.basename(record), 256, owners={owner})
    except FileNotFoundError:
        return None
    return text.decode("ascii", "replace").split("\n")[0].strip()


def master_process(path: str) -> psutil.Process | None:
    """The live lancelotd master the PID file names, or None if the file is stale or refused."""
    try:
        return examine(path)[0]
    except OSError:
        return None


def examine(path: str) -> tuple[psutil.Process | None, int | None, str]:
    """(the master or None, the PID named, why it is not a master): every proof of the rule above.

    OSError (FileNotFoundError, PermissionError, trust.Untrusted) when the file cannot be read safely.
    """
    pid, owner = read_owned(path)
    if pid is None:
        return None, None, "holds no PID"
    if pid == os.getpid():
        return None, pid, "which is this very process"
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None, pid, GONE
        if not " ".join(proc.cmdline()).startswith(TITLE_PREFIX):
            return None, pid, NOT_OURS
        uids = proc.uids()
        if uids.real != owner or uids.effective != owner:
            return None, pid, (f"which runs as uid {uids.real} while the PID file is uid {owner}'s: "
                               "refusing to believe it")
        recorded = recorded_identity(path, pid, owner)
    except psutil.NoSuchProcess:
        return None, pid, GONE
    except psutil.Error as e:
        return None, pid, f"which cannot be examined ({e})"
    except trust.Untrusted as e:
        return None, pid, f"whose start record is refused: {e}"
    if recorded is not None and recorded != identity(pid):
        return None, pid, REUSED
    return proc, pid, ""


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
    try:
        pid = read(path)
    except OSError:  # a link, a FIFO, a stranger's file: stale whatever it says
        pid = None
    if os.path.lexists(path):
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
