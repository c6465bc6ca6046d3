"""Classic daemon mode (`serve --daemon`) with python-daemon's DaemonContext.

The launching process returns only once the detached master is listening
and has written its PID file (exit 0), or with the reason it failed (exit 1):
a ready pipe, as unicorn does, rather than a race against the PID file.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

import daemon

from .launcher import ENV_READY_FD

READY_TIMEOUT = 60.0  # a master not serving by then has failed (its log says why)


def detach(keep_fds: list[int]) -> int | None:
    """Fork off a daemon.  In the launcher: its exit code.  In the daemon: None."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(ready_w)
        return _wait_for_daemon(ready_r, pid)
    os.close(ready_r)
    os.environ[ENV_READY_FD] = str(ready_w)
    context = daemon.DaemonContext(
        working_directory="/",
        umask=0o022,  # python-daemon's default of 0 would make world-writable files
        detach_process=True,
        files_preserve=[*keep_fds, ready_w],
        # python-daemon's default map ignores TTIN/TTOU and turns TERM into an
        # exception; the master installs its own handlers for all of these.
        signal_map={signal.SIGTSTP: signal.SIG_IGN},
    )
    context.open()
    return None


def _wait_for_daemon(ready_r: int, pid: int) -> int:
    os.waitpid(pid, 0)  # the intermediate process, gone as soon as it detached
    news = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while b"\n" not in news:
        if not select.select([ready_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
            news = f"error not ready after {READY_TIMEOUT:.0f}s (see the log)\n".encode()
            break
        chunk = os.read(ready_r, 4096)
        if not chunk:
            break
        news += chunk
    os.close(ready_r)
    if news.startswith(b"ready\n"):
        return 0  # listening, PID file written, workers serving
    reason = news.decode("utf-8", "replace").strip().removeprefix("error ")
    reason = reason or "the daemon exited before it was ready"
    print(f"lancelotd: {reason}", file=sys.stderr)
    return 1


def report_failure(message: str, fd: int | str | None = None) -> None:
    """Hand a start failure to whoever waits on the ready pipe (--daemon's launcher, USR2)."""
    fd = fd if fd is not None else os.environ.pop(ENV_READY_FD, None)
    if fd:
        try:
            os.write(int(fd), f"error {message}\n".encode("utf-8", "replace"))
        except OSError:
            pass
