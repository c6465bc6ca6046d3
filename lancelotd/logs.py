"""Logging: one line per event with time, level, PID and role (docs/PROMISES.md §3).

`[log] format`: "text" (the default), or "json": one object per line with stable keys,
`time` (ISO 8601, UTC), `level`, `pid`, `role` ("master" or "worker"), `worker` (a worker's
number), `generation`, `message`, and the event's own fields, passed as
`log.info(..., extra={"fields": {...}})`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable

log = logging.getLogger("lancelotd")

_role = "master"
file_owner = None  # privileges.Identity of a root master's workers: they reopen the log file too
_generation = 1
_format = "text"
FORMATS = ("text", "json")
# Called after every successful reopen (USR1, reload): the access log (connlog.py) follows.
REOPEN_HOOKS: list[Callable[[], None]] = []
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


def set_generation(generation: int) -> None:
    """The generation this process serves (a worker's; the master's current one), for JSON lines."""
    global _generation
    _generation = generation


class JsonFormatter(logging.Formatter):
    """One JSON object per line; keys as in the module's docstring, the event's fields after them."""

    def format(self, record: logging.LogRecord) -> str:
        role, _, number = _role.partition(" ")
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, object] = {
            "time": f"{when}.{int(record.msecs):03d}Z", "level": record.levelname.lower(),
            "pid": record.process, "role": role}
        if number.isdigit():
            entry["worker"] = int(number)
        entry["generation"] = _generation
        entry["message"] = record.getMessage()
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update((k, v) for k, v in fields.items() if k not in entry)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def current_format() -> str:
    return _format


def open_fds() -> list[int]:
    """Descriptors our log handlers write to (python-daemon must keep them)."""
    fds = []
    for handler in log.handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            fds.append(stream.fileno())
    return fds


def setup(log_file: str, level: str, fmt: str | None = None) -> None:
    """Send lancelotd's log to `log_file` (appended) or to stderr when empty, in `fmt` ("text",
    "json"; None: as before).

    Called again on reload and on USR1: the old handler is closed only after
    the new one is in place, so no line is lost.  Raises OSError when the file
    cannot be opened, and then leaves the handlers as they were.
    """
    global _format
    if log_file:
        handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
        if file_owner is not None and os.geteuid() == 0:  # the workers (USR1) reopen it as themselves
            try:
                os.fchown(handler.stream.fileno(), file_owner.uid, file_owner.gid)
            except OSError:
                handler.close()
                raise
    else:
        handler = logging.StreamHandler(sys.stderr)
    fmt = fmt or _format
    journal = not log_file and stderr_is_journal()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())  # the journal takes JSON lines as they are
    else:
        handler.setFormatter(logging.Formatter(JOURNAL_FORMAT if journal else FORMAT))
    _format = fmt
    handler.addFilter(_RoleFilter())
    old = list(log.handlers)
    log.addHandler(handler)
    for h in old:
        log.removeHandler(h)
        h.close()
    log.setLevel(level.upper())
    log.propagate = False


def reopen(log_file: str, level: str, fmt: str | None = None) -> bool:
    """setup() in a running process (USR1, reload, rollback): True if done.

    A file that cannot be opened (its directory removed, permissions) must
    not end the process: the error is logged through the handler in place,
    which keeps writing to the file it has open, and the caller serves on.
    """
    try:
        setup(log_file, level, fmt)
    except OSError as e:
        log.error("cannot reopen log file %s: %s; still logging to the file already open",
                  log_file, e.strerror or e)
        return False
    for hook in REOPEN_HOOKS:
        hook()  # each says itself what it could not do
    return True
