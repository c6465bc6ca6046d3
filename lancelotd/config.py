"""Configuration: TOML file -> validated, immutable Config (SPEC §4).

Every setting is declared once in SETTINGS (table, key, default, checker);
validation walks the whole file and reports every problem with its key, so
`check-config`, start-up and reload all give the same verdict.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_ANSWERS = {
    "What is your name?": "My name is Sir Lancelot of Camelot.",
    "What is your quest?": "To seek the Holy Grail.",
    "What is your favorite color?": "Blue.",
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def default_pid_file() -> str:
    """/run/lancelotd/lancelotd.pid for root, else under $XDG_RUNTIME_DIR, else under /tmp/lancelotd-UID.

    The directory need not exist: the master creates it (lancelotd.runtime).
    XDG_RUNTIME_DIR counts only when absolute, as the XDG spec says.
    """
    if os.geteuid() == 0:
        return "/run/lancelotd/lancelotd.pid"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if not os.path.isabs(runtime):
        runtime = f"/tmp/lancelotd-{os.geteuid()}"
    return os.path.join(runtime, "lancelotd", "lancelotd.pid")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    bind: tuple[str, ...] = ("0.0.0.0:1060",)
    workers: int = field(default_factory=cpu_count)
    backlog: int = 4096
    pid_file: str = field(default_factory=default_pid_file)
    metrics_bind: str = ""
    unknown_answer: str = "I don't know that."
    max_question_bytes: int = 1024
    idle_timeout: float = 60.0
    max_connections: int = 10000
    graceful_timeout: float = 30.0
    worker_timeout: float = 30.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    log_file: str = ""
    log_level: str = "info"
    answers: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ANSWERS))
    path: str = ""  # the file it came from, "" for built-in defaults

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with the command line's options applied (None = not given)."""
        given = {k: v for k, v in changes.items() if v is not None}
        if "bind" in given:
            given["bind"] = tuple(given["bind"])
        return replace(self, **given)


class ConfigError(Exception):
    """The file could not be used; .problems lists every reason as 'key: why'."""

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


# --- checkers: each returns None or a reason ------------------------------

def _positive_int(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        return f"must be a positive integer, not {v!r}"
    return None


def _positive_number(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        return f"must be a positive number of seconds, not {v!r}"
    return None


def _count(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return f"must be an integer >= 0, not {v!r}"
    return None


def _workers(v: Any) -> str | None:
    return None if v == "auto" else _positive_int(v) and f"must be a positive integer or \"auto\", not {v!r}"


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else f"must be a string, not {v!r}"


def _log_level(v: Any) -> str | None:
    return None if v in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}, not {v!r}"


def _binds(v: Any) -> str | None:
    from .sockets import parse_address  # local: sockets imports nothing from here

    if not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v):
        return f"must be a non-empty list of \"HOST:PORT\" strings, not {v!r}"
    for address in v:
        try:
            parse_address(address)
        except ValueError as e:
            return str(e)
    return None


def _optional_address(v: Any) -> str | None:
    if v == "":
        return None
    return _binds([v]) if isinstance(v, str) else f"must be \"HOST:PORT\" or \"\", not {v!r}"


def _answer_text(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"must be a string, not {v!r}"
    if not v.isascii():
        return "must be ASCII"
    if not v.endswith(".") or v.count(".") != 1:
        return "must end with '.' and contain no other '.'"
    return None


# (table, key) -> (Config field, checker); the shipped etc/lancelotd.toml
# documents each of them.
SETTINGS: dict[tuple[str, str], tuple[str, Callable[[Any], str | None]]] = {
    ("server", "bind"): ("bind", _binds),
    ("server", "workers"): ("workers", _workers),
    ("server", "backlog"): ("backlog", _positive_int),
    ("server", "pid_file"): ("pid_file", _string),
    ("server", "metrics_bind"): ("metrics_bind", _optional_address),
    ("protocol", "unknown_answer"): ("unknown_answer", _answer_text),
    ("protocol", "max_question_bytes"): ("max_question_bytes", _positive_int),
    ("protocol", "idle_timeout"): ("idle_timeout", _positive_number),
    ("protocol", "max_connections"): ("max_connections", _positive_int),
    ("lifecycle", "graceful_timeout"): ("graceful_timeout", _positive_number),
    ("lifecycle", "worker_timeout"): ("worker_timeout", _positive_number),
    ("lifecycle", "max_requests"): ("max_requests", _count),
    ("lifecycle", "max_requests_jitter"): ("max_requests_jitter", _count),
    ("log", "file"): ("log_file", _string),
    ("log", "level"): ("log_level", _log_level),
}
TABLES = {table for table, _ in SETTINGS} | {"answers"}


def check_answers(answers: Any, max_question_bytes: int) -> list[str]:
    if not isinstance(answers, dict):
        return [f"answers: must be a table of question = answer, not {answers!r}"]
    problems = []
    for question, answer in answers.items():
        key = f"answers.{question!r}"
        if not question.isascii():
            problems.append(f"{key}: question must be ASCII")
        elif not question.strip().endswith("?") or question.count("?") != 1:
            problems.append(f"{key}: question must end with '?' and contain no other '?'")
        elif len(question.strip()) > max_question_bytes:
            problems.append(f"{key}: question is longer than max_question_bytes ({max_question_bytes})")
        reason = _answer_text(answer)
        if reason:
            problems.append(f"{key}: answer {reason}")
    return problems


def from_dict(data: dict[str, Any], path: str = "") -> Config:
    """Validate a parsed TOML document completely; raise ConfigError listing every problem."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for table, content in data.items():
        if table not in TABLES:
            problems.append(f"{table}: unknown table (known: {', '.join(sorted(TABLES))})")
            continue
        if not isinstance(content, dict):
            problems.append(f"{table}: must be a table")
            continue
        if table == "answers":
            continue
        for key, value in content.items():
            setting = SETTINGS.get((table, key))
            if setting is None:
                problems.append(f"{table}.{key}: unknown setting")
                continue
            name, check = setting
            reason = check(value)
            if reason:
                problems.append(f"{table}.{key}: {reason}")
            else:
                values[name] = value
    if values.get("workers") == "auto":
        del values["workers"]
    if "bind" in values:
        values["bind"] = tuple(values["bind"])
    max_bytes = values.get("max_question_bytes", Config.max_question_bytes)
    if "answers" in data:
        problems += check_answers(data["answers"], max_bytes)
        values["answers"] = dict(data["answers"])
    if problems:
        raise ConfigError(path or "<config>", problems)
    return Config(path=path, **values)


def load(path: str | None) -> Config:
    """The Config in `path`, or the built-in defaults when path is None."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    return from_dict(data, os.path.abspath(path))
