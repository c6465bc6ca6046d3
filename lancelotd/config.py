"""Configuration: TOML file -> validated, immutable Config (docs/PROMISES.md §3).

Every setting is declared once in SETTINGS (table, key, default, checker);
validation walks the whole file and reports every problem with its key, so
`check-config`, start-up and reload all give the same verdict.  The checkers
of single values and the bounds they enforce are in checks.py.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from . import checks
from .checks import (
    MAX_BACKLOG,
    MAX_CONNECTIONS,
    MAX_DRAIN_DELAY,
    MAX_DRAIN_SPREAD,
    MAX_QUESTION_BYTES,
    MAX_SECONDS,
    MAX_WORKERS,
    MIN_WORKER_TIMEOUT,
    Checker,
)

DEFAULT_ANSWERS = {
    "What is your name?": "My name is Sir Lancelot of Camelot.",
    "What is your quest?": "To seek the Holy Grail.",
    "What is your favorite color?": "Blue.",
}


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
class Listener:
    """A [[listener]] table: one address, with options of its own (see the section below)."""

    bind: str
    proxy_protocol: bool = False
    proxy_protocol_from: tuple[str, ...] = ()
    mode: int = 0o660  # a UNIX socket's file mode (sockets.UNIX_MODE), owner and group ("": ours)
    owner: str = ""
    group: str = ""


@dataclass(frozen=True)
class Config:
    bind: tuple[str, ...] = ("0.0.0.0:1060",)
    listeners: tuple[Listener, ...] = ()  # [[listener]]: more addresses, each with its options
    workers: int = field(default_factory=lambda: min(cpu_count(), MAX_WORKERS))  # "auto"
    backlog: int = 4096
    pid_file: str = field(default_factory=default_pid_file)
    metrics_bind: str = ""
    spread_connections: bool = False  # spread.py
    user: str = ""  # a root master's workers run as this user (privileges.py); "" = as the master
    group: str = ""  # ...and group; "" = the user's own
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
    log_format: str = "text"  # or "json" (logs.py)
    access_log: str = ""  # "" = off, "stderr", or a file (connlog.py)
    # [balancer] (balancer.py, draining.py)
    agent_bind: str = ""
    drain_file: str = ""  # "" = PIDFILE.drain
    drain_delay: float = 0.0
    drain_spread: float = 5.0
    max_connection_age: float = 0.0
    max_connection_age_jitter: float = 0.0
    answers: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ANSWERS))
    allow: tuple[str, ...] = ()  # [access]: see the section "access" below
    deny: tuple[str, ...] = ()
    max_connections_per_client: int = 0  # 0 = no limit
    max_connections_per_client_ipv6_prefix: int = 128  # IPv6 clients counted per /N block (128: per address)
    path: str = ""  # the file it came from, "" for built-in defaults

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address to listen on: [server] bind, then each [[listener]]'s."""
        return self.bind + tuple(listener.bind for listener in self.listeners)

    def with_overrides(self, **changes: Any) -> Config:
        """A copy with the command line's options applied (None = not given).

        They pass the same checks as the file's settings; a problem names the
        option (--workers), as the file's name their keys.
        """
        given = {k: v for k, v in changes.items() if v is not None}
        checkers = {name: check for name, check in SETTINGS.values()}
        problems = [f"--{name.replace('_', '-')}: {reason}"
                    for name, value in given.items() if (reason := checkers[name](value))]
        if problems:
            raise ConfigError("command line", problems)
        if "bind" in given:
            given["bind"] = tuple(given["bind"])
            problems = listener_clashes(given["bind"], self.listeners, "--bind")
            if problems:
                raise ConfigError("command line", problems)
        return replace(self, **given)


class ConfigError(Exception):
    """The file could not be used; .problems lists every reason as 'key: why'."""

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


# --- access: allow / deny / max_connections_per_client (access.py) ----------

ACCESS_SETTINGS: dict[tuple[str, str], tuple[str, Checker]] = {
    ("access", "allow"): ("allow", checks.access_list),
    ("access", "deny"): ("deny", checks.access_list),
    ("access", "max_connections_per_client"):
        ("max_connections_per_client", checks.int_in(0, MAX_CONNECTIONS)),
    ("access", "max_connections_per_client_ipv6_prefix"):
        ("max_connections_per_client_ipv6_prefix", checks.int_in(16, 128)),
}
ACCESS_LISTS = ("allow", "deny")


# --- [[listener]]: addresses with options of their own (PROXY protocol v2: proxied.py) -----

LISTENER_KEYS = ("bind", "proxy_protocol", "proxy_protocol_from", "mode", "owner", "group")
NO_EMPTY = 'must not be empty ("all" trusts every source)'


def check_listeners(tables: Any) -> tuple[tuple[Listener, ...], list[str]]:
    """[[listener]] tables: (the listeners, problems as "listener[I].key: why"; I counts from 0).

    proxy_protocol_from is required with proxy_protocol = true (the spec: take the header
    from trusted proxies only; "all" trusts everyone, as HAProxy's accept-proxy does), and
    refused without it (it would do nothing).
    """
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        return (), ["listener: must be an array of tables ([[listener]])"]
    listeners, problems = [], []
    for i, table in enumerate(tables):
        key = f"listener[{i}]"
        problems += [f"{key}.{name}: unknown setting (known: {', '.join(LISTENER_KEYS)})"
                     for name in table if name not in LISTENER_KEYS]
        bind, proxied = table.get("bind", ""), table.get("proxy_protocol", False)
        trusted = table.get("proxy_protocol_from")
        given = isinstance(bind, str) and bind
        if reason := (checks.binds([bind]) if given else "is required (\"HOST:PORT\" or \"unix:PATH\")"):
            problems.append(f"{key}.bind: {reason}")
            bind = ""  # kept in its place, so the clash checks name the others by their index
        if not isinstance(proxied, bool):
            problems.append(f"{key}.proxy_protocol: must be true or false, not {proxied!r}")
        if trusted is None and proxied is True:
            problems.append(f"{key}.proxy_protocol_from: required with proxy_protocol = true: the "
                            "balancers' addresses or CIDR blocks (\"all\" trusts every source)")
        elif trusted is not None and (reason := checks.access_list(trusted) or ("" if trusted else NO_EMPTY)):
            problems.append(f"{key}.proxy_protocol_from: {reason}")
        elif trusted is not None and proxied is False:
            problems.append(f"{key}.proxy_protocol_from: has no effect without proxy_protocol = true")
        unix, unix_problems = check_unix_options(table, key, bind, proxied)
        problems += unix_problems
        listeners.append(Listener(bind, proxied, tuple(trusted) if isinstance(trusted, list) else (), *unix))
    return tuple(listeners), problems


def check_unix_options(table: dict, key: str, bind: str,
                       proxied: Any) -> tuple[tuple[int, str, str], list[str]]:
    """A [[listener]]'s mode, owner and group: for a "unix:PATH" bind only."""
    problems = []
    unix = bind.startswith("unix:")
    mode, owner, group = table.get("mode", 0o660), table.get("owner", ""), table.get("group", "")
    for name in ("mode", "owner", "group"):
        if name in table and not unix:
            problems.append(f"{key}.{name}: only for a UNIX socket (bind = \"unix:PATH\")")
    if isinstance(mode, str) and mode and all(c in "01234567" for c in mode):
        mode = int(mode, 8)  # "0660", as chmod takes it (TOML also has 0o660)
    if "mode" in table and (not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777):
        problems.append(f"{key}.mode: must be a file mode such as \"0660\" or 0o660, not {table['mode']!r}")
        mode = 0o660
    for name, value in (("owner", owner), ("group", group)):
        if not isinstance(value, str):
            problems.append(f"{key}.{name}: must be a user or group name (or number), not {value!r}")
    if unix and proxied is True:
        problems.append(f"{key}.proxy_protocol: not supported on a UNIX socket")
    return (mode, owner if isinstance(owner, str) else "", group if isinstance(group, str) else ""), problems


def service_addresses(bind: tuple[str, ...], listeners: tuple[Listener, ...],
                      bind_key: str = "server.bind") -> list[tuple[str, str]]:
    """(address, the key that set it) of every service listener."""
    named = [(x.bind, f"listener[{i}].bind") for i, x in enumerate(listeners) if x.bind]
    return [(a, bind_key) for a in bind] + named


def listener_clashes(bind: tuple[str, ...], listeners: tuple[Listener, ...], bind_key: str) -> list[str]:
    """Two listening addresses that cannot both be bound, one of them a [[listener]]'s."""
    named = service_addresses(bind, listeners, bind_key)
    return [f"{key}: {clash} in {earlier_key}"
            for i, (address, key) in enumerate(named) if key.startswith("listener")
            for earlier, earlier_key in named[:i] if (clash := checks.bind_clash(earlier, address))]


# (table, key) -> (Config field, checker); the shipped etc/lancelotd.toml
# documents each of them.
SETTINGS: dict[tuple[str, str], tuple[str, Checker]] = {
    ("server", "bind"): ("bind", checks.binds),
    ("server", "workers"): ("workers", checks.workers),
    ("server", "backlog"): ("backlog", checks.int_in(1, MAX_BACKLOG)),
    ("server", "pid_file"): ("pid_file", checks.string),
    ("server", "metrics_bind"): ("metrics_bind", checks.optional_address),
    ("server", "spread_connections"): ("spread_connections", checks.flag),
    ("server", "user"): ("user", checks.user),
    ("server", "group"): ("group", checks.group),
    ("protocol", "unknown_answer"): ("unknown_answer", checks.answer_text),
    ("protocol", "max_question_bytes"): ("max_question_bytes", checks.int_in(1, MAX_QUESTION_BYTES)),
    ("protocol", "idle_timeout"): ("idle_timeout", checks.seconds()),
    ("protocol", "max_connections"): ("max_connections", checks.int_in(1, MAX_CONNECTIONS)),
    ("lifecycle", "graceful_timeout"): ("graceful_timeout", checks.seconds()),
    ("lifecycle", "worker_timeout"): ("worker_timeout", checks.seconds(MIN_WORKER_TIMEOUT)),
    ("lifecycle", "max_requests"): ("max_requests", checks.count),
    ("lifecycle", "max_requests_jitter"): ("max_requests_jitter", checks.count),
    ("balancer", "agent_bind"): ("agent_bind", checks.optional_address),
    ("balancer", "drain_file"): ("drain_file", checks.string),
    ("balancer", "drain_delay"): ("drain_delay", checks.seconds_or_zero(MAX_DRAIN_DELAY)),
    ("balancer", "drain_spread"): ("drain_spread", checks.seconds_or_zero(MAX_DRAIN_SPREAD)),
    ("balancer", "max_connection_age"): ("max_connection_age", checks.seconds_or_zero(MAX_SECONDS)),
    ("balancer", "max_connection_age_jitter"):
        ("max_connection_age_jitter", checks.seconds_or_zero(MAX_SECONDS)),
    ("log", "file"): ("log_file", checks.string),
    ("log", "level"): ("log_level", checks.log_level),
    ("log", "format"): ("log_format", checks.log_format),
    ("log", "access"): ("access_log", checks.string),
    **ACCESS_SETTINGS,
}
TABLES = {table for table, _ in SETTINGS} | {"answers", "listener"}


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
        reason = checks.answer_text(answer)
        if reason:
            problems.append(f"{key}: answer {reason}")
    return problems


def check_together(values: dict[str, Any], base_dir: str) -> list[str]:
    """Problems of settings that are each valid alone: combinations, and the file system."""
    problems = []
    log_problem = checks.check_log_file(values.get("log_file", ""), base_dir)
    if log_problem:
        problems.append(f"log.file: {log_problem}")
    access = values.get("access_log", "")
    if access != "stderr" and (access_problem := checks.check_log_file(access, base_dir)):
        problems.append(f"log.access: {access_problem}")
    metrics = values.get("metrics_bind", "")
    service = service_addresses(values.get("bind", Config.bind), values.get("listeners", ()))
    for address, key in service if metrics else ():
        clash = checks.bind_clash(address, metrics)
        if clash:
            problems.append(f"server.metrics_bind: {clash} in {key}")
    agent = values.get("agent_bind", "")
    others = list(service)
    problems += listener_clashes(values.get("bind", Config.bind), values.get("listeners", ()), "server.bind")
    others.append((metrics, "server.metrics_bind"))
    for address, key in others if agent and not agent.endswith(":0") else ():  # port 0: a port of its own
        clash = address and checks.bind_clash(address, agent)
        if clash:
            problems.append(f"balancer.agent_bind: {clash} in {key}")
    if values.get("max_connection_age_jitter", 0) and not values.get("max_connection_age", 0):
        problems.append("balancer.max_connection_age_jitter: has no effect without max_connection_age; "
                        "set max_connection_age too, or remove it")
    if values.get("group") and not values.get("user"):
        problems.append("server.group: needs server.user too (the workers' user, then its group)")
    if values.get("max_requests_jitter", 0) and not values.get("max_requests", 0):
        problems.append("lifecycle.max_requests_jitter: has no effect without max_requests; "
                        "set max_requests too, or remove it")
    return problems


def from_dict(data: dict[str, Any], path: str = "", base_dir: str | None = None) -> Config:
    """Validate a parsed TOML document completely; raise ConfigError listing every problem.

    Relative paths are checked against base_dir (default: the current
    directory), the directory they will be resolved against.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    for table, content in data.items():
        if table not in TABLES:
            problems.append(f"{table}: unknown table (known: {', '.join(sorted(TABLES))})")
            continue
        if table == "listener":
            listeners, listener_problems = check_listeners(content)
            problems += listener_problems
            values["listeners"] = listeners
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
    if values.get("listeners") and "bind" not in values:
        values["bind"] = ()  # [[listener]] tables alone: the default address is not wanted too
    problems += check_together(values, base_dir if base_dir is not None else os.getcwd())
    if values.get("workers") == "auto":
        del values["workers"]
    if "bind" in values:
        values["bind"] = tuple(values["bind"])
    for name in ACCESS_LISTS:
        if name in values:
            values[name] = tuple(values[name])
    max_bytes = values.get("max_question_bytes", Config.max_question_bytes)
    if "answers" in data:
        problems += check_answers(data["answers"], max_bytes)
        values["answers"] = dict(data["answers"])
    if problems:
        raise ConfigError(path or "<config>", problems)
    return Config(path=path, **values)


def load(path: str | None, base_dir: str | None = None) -> Config:
    """The Config in `path`, or the built-in defaults when path is None."""
    if path is None:
        return Config()
    return from_dict(read_toml(path), os.path.abspath(path), base_dir)


def read_toml(path: str) -> dict[str, Any]:
    """The file as parsed TOML, or ConfigError saying why not."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
