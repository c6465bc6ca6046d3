"""The bounds of the settings, and the checkers of single values (config.py).

Each checker returns None or the reason the value is refused, worded to
follow its key ("server.workers: must be ...").  config.py declares which
setting each one checks; checks of settings together are there too.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from typing import Any

from .scoreboard import SLOTS

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# Bounds; etc/lancelotd.toml gives the reason for each next to its setting.
MAX_WORKERS = SLOTS // 2  # a reload runs the old and the new generation side by side
MAX_BACKLOG = 65535  # listen() overflows past a C int; the kernel caps it at somaxconn anyway
MAX_QUESTION_BYTES = 65536
MAX_ANSWER_BYTES = 1024  # a read can hold a question per byte ("?"): bounds what it makes a worker send
MAX_CONNECTIONS = 1_000_000
MAX_SECONDS = 86400.0  # every timeout: finite, so deadlines stay sane numbers
MIN_WORKER_TIMEOUT = 1.0  # a worker's loop heartbeats once a second
MAX_DRAIN_DELAY = 300.0  # a stop that waits longer is a mistake; systemd must wait that long too
MAX_DRAIN_SPREAD = 3600.0


Checker = Callable[[Any], str | None]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_in(low: int, high: int) -> Checker:
    def check(v: Any) -> str | None:
        if not is_int(v) or not low <= v <= high:
            return f"must be an integer from {low} to {high}, not {v!r}"
        return None
    return check


def seconds(at_least: float = 0.0) -> Checker:
    """More than 0 (and at least `at_least`), at most a day; nan and inf fail both tests."""
    def check(v: Any) -> str | None:
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not number or not (v > 0 and at_least <= v <= MAX_SECONDS):
            low = f"at least {at_least:g}" if at_least else "more than 0"
            return f"must be a number of seconds, {low} and at most {MAX_SECONDS:g} (a day), not {v!r}"
        return None
    return check


def seconds_or_zero(most: float) -> Checker:
    """0 (off) up to `most` seconds."""
    def check(v: Any) -> str | None:
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not number or not 0 <= v <= most:
            return f"must be a number of seconds from 0 to {most:g}, not {v!r}"
        return None
    return check


def flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, not {v!r}"


def count(v: Any) -> str | None:
    if not is_int(v) or v < 0:
        return f"must be an integer >= 0, not {v!r}"
    return None


def workers(v: Any) -> str | None:
    if v == "auto" or (is_int(v) and 1 <= v <= MAX_WORKERS):
        return None
    return (f"must be \"auto\" or an integer from 1 to {MAX_WORKERS} (the scoreboard holds {SLOTS} "
            f"processes, two generations during a reload), not {v!r}")


def string(v: Any) -> str | None:
    return None if isinstance(v, str) else f"must be a string, not {v!r}"


def user(v: Any) -> str | None:
    from .privileges import user_problem  # local: privileges imports runtime

    return string(v) or user_problem(v)


def group(v: Any) -> str | None:
    from .privileges import group_problem

    return string(v) or group_problem(v)


def log_level(v: Any) -> str | None:
    return None if v in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}, not {v!r}"


LOG_FORMATS = ("text", "json")  # logs.FORMATS


def log_format(v: Any) -> str | None:
    return None if v in LOG_FORMATS else f"must be one of {', '.join(LOG_FORMATS)}, not {v!r}"


def binds(v: Any) -> str | None:
    from .sockets import parse_address  # local: sockets imports nothing from here

    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(a, str) for a in v):
        return f"must be a non-empty list of \"HOST:PORT\" or \"unix:PATH\" strings, not {v!r}"
    for address in v:
        try:
            parse_address(address)
        except ValueError as e:
            return str(e)
    for i, address in enumerate(v):
        for earlier in v[:i]:
            clash = bind_clash(earlier, address)
            if clash:
                return clash
    return None


def normal_address(address: str) -> tuple[str, str, int]:
    """(family, host, port) with the host's spelling made canonical ("::1" for "0:0::1")."""
    from .sockets import parse_address

    host, port = parse_address(address)
    if address.startswith("unix:"):
        return "unix", host, 0  # only the same path clashes
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "name", host.lower(), port  # a host name: only the same name is known to clash
    return f"ipv{ip.version}", str(ip), port


def bind_clash(first: str, second: str) -> str | None:
    """Why two listening addresses cannot both be bound, or None.

    The same address twice is refused even with port 0: listeners are kept
    by address, so the second socket would be lost.  A wildcard and a
    specific address of one family on one port clash too: Linux refuses
    the second bind (EADDRINUSE) even with SO_REUSEADDR.
    """
    family, host, port = normal_address(first)
    family2, host2, port2 = normal_address(second)
    if (family, host, port) == (family2, host2, port2):
        return f"{second!r} is the same address as {first!r}"
    wildcards = ("0.0.0.0", "::")
    if family == family2 and port == port2 != 0 and (host in wildcards or host2 in wildcards):
        return f"{second!r} overlaps {first!r}: the wildcard address already holds port {port}"
    return None


def optional_address(v: Any) -> str | None:
    if v == "":
        return None
    if isinstance(v, str) and v.startswith("unix:"):
        return "must be \"HOST:PORT\" (a TCP address; UNIX sockets are for the service's listeners)"
    return binds([v]) if isinstance(v, str) else f"must be \"HOST:PORT\" or \"\", not {v!r}"


def answer_text(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"must be a string, not {v!r}"
    if not v.isascii():
        return "must be ASCII"
    if not v.endswith(".") or v.count(".") != 1:
        return "must end with '.' and contain no other '.'"
    if len(v) > MAX_ANSWER_BYTES:
        return f"is {len(v)} bytes long, more than {MAX_ANSWER_BYTES}"
    return None


def check_log_file(path: str, base_dir: str) -> str | None:
    """Can a log file be created at `path` (relative to base_dir)?  Its directory must exist.

    Whether this process may write there is left to start-up, which opens
    it: check-config may run as another user than the service.
    """
    if not path:
        return None
    full = os.path.join(base_dir, path)
    if os.path.isdir(full):
        return f"{full} is a directory"
    directory = os.path.dirname(full)
    if not os.path.exists(directory):
        return f"directory {directory} does not exist"
    if not os.path.isdir(directory):
        return f"{directory} is not a directory"
    return None


def access_list(v: Any) -> str | None:
    """A list of "all", addresses and CIDR blocks, each of which parses (the bad one is named)."""
    from .access import parse_rule  # local: access imports the shared-memory counts

    if not isinstance(v, list) or not all(isinstance(entry, str) for entry in v):
        return f"must be a list of addresses and CIDR blocks (strings), not {v!r}"
    for entry in v:
        try:
            parse_rule(entry)
        except ValueError as e:
            return str(e)
    return None
