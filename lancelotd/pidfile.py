"""The PID file: its presence means "a lancelotd master is listening" (SPEC §4).

Written atomically (temporary file + rename) once the sockets are bound,
removed at exit.  A file left behind by a dead process, or naming a PID that
the kernel has since given to something else, never blocks a start.
"""

from __future__ import annotations

import os

import psutil

from . import runtime
from .logs import log

TITLE_PREFIX = "lancelotd: master"


class AlreadyRunning(Exception):
    def __init__(self, path: str, pid: int) -> None:
        super().__init__(f"lancelotd is already running as PID {pid} (PID file {path})")
        self.pid = pid


def read(path: str) -> int | None:
    """The PID in the file, or None when there is no file or it holds no PID."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def master_process(path: str) -> psutil.Process | None:
    """The live lancelotd master the PID file names, or None if the file is stale.

    A PID is ours only when that process is a lancelotd master and it was
    already running when the file was written: a recycled PID fails one test
    or the other.
    """
    pid = read(path)
    if pid is None or pid == os.getpid():
        return None
    try:
        written = os.stat(path).st_mtime
        proc = psutil.Process(pid)
        started = proc.create_time()
        cmdline = " ".join(proc.cmdline())
    except (OSError, psutil.Error):
        return None
    if started > written + 1.0 or not cmdline.startswith(TITLE_PREFIX):
        return None
    return proc


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


def write(path: str, pid: int) -> None:
    tmp = f"{path}.{pid}.tmp"
    fd = runtime.open_new_file(tmp, os.O_WRONLY, 0o644)
    try:
        os.write(fd, f"{pid}\n".encode("ascii"))
        os.fsync(fd)
        os.fchmod(fd, 0o644)  # readable by `lancelotd status` as any user, whatever the umask
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove(path: str, pid: int) -> None:
    """Remove the file if it is still ours (an upgrade may have handed it on)."""
    if read(path) == pid:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
