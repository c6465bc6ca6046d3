"""Logging: one line per event with time, level, PID and role (SPEC §4)."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("lancelotd")

_role = "master"
FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(role)s: %(message)s"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


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
    the new one is in place, so no line is lost.
    """
    if log_file:
        handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_RoleFilter())
    old = list(log.handlers)
    log.addHandler(handler)
    for h in old:
        log.removeHandler(h)
        h.close()
    log.setLevel(level.upper())
    log.propagate = False
