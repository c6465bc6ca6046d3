"""Logging: one line per event with time, level, PID and role (docs/PROMISES.md §3)."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("lancelotd")

_role = "master"
FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(role)s: %(message)s"
# For the journal: it stamps the time itself, and takes a syslog priority
# from a "<N>" prefix, so `journalctl -p err` finds refused reloads.
JOURNAL_FORMAT = "<%(priority)d>%(levelname)s [%(process)d] %(role)s: %(message)s"
PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        record.priority = PRIORITIES.get(record.levelname, 6)
        return True


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to journald ($JOURNAL_STREAM names it)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{device}:{inode}"


def set_role(role: str) -> None:
    """Name the process in every later line ('master', 'worker 3')."""
    global _role
    _role = role


def open_fds() -> list[int]:
    """Descriptors our log handlers write to (python-daemon must keep them)."""
    fds = []
    for handler in log.handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            fds.append(stream.fileno())
    return fds


def setup(log_file: str, level: str) -> None:
    """Send lancelotd's log to `log_file` (appended) or to stderr when empty.

    Called again on reload and on USR1: the old handler is closed only after
    the new one is in place, so no line is lost.  Raises OSError when the file
    cannot be opened, and then leaves the handlers as they were.
    """
    if log_file:
        handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    journal = not log_file and stderr_is_journal()
    handler.setFormatter(logging.Formatter(JOURNAL_FORMAT if journal else FORMAT))
    handler.addFilter(_RoleFilter())
    old = list(log.handlers)
    log.addHandler(handler)
    for h in old:
        log.removeHandler(h)
        h.close()
    log.setLevel(level.upper())
    log.propagate = False


def reopen(log_file: str, level: str) -> bool:
    """setup() in a running process (USR1, reload, rollback): True if done.

    A file that cannot be opened (its directory removed, permissions) must
    not end the process: the error is logged through the handler in place,
    which keeps writing to the file it has open, and the caller serves on.
    """
    try:
        setup(log_file, level)
    except OSError as e:
        log.error("cannot reopen log file %s: %s; still logging to the file already open",
                  log_file, e.strerror or e)
        return False
    return True
