"""What an operator sees of a running daemon: `status --json` (its documented schema, its counters)
and the master's Prometheus endpoint."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .cli import status_json
from .daemon import Daemon
from .timing import scaled, wait_for


def status_config(workers: int = 2, color: str = "Blue.", server: str = "", protocol: str = "",
                  lifecycle: str = "") -> str:
    """A complete config for the status and metrics tests: `server`, `protocol`, `lifecycle` are
    extra lines for those tables."""
    return f"""
[server]
workers = {workers}
{server}
[protocol]
unknown_answer = "No idea."
max_question_bytes = 64
{protocol}
[lifecycle]
graceful_timeout = 20
{lifecycle}
[answers]
"What is your name?" = "My name is Sir Lancelot of Camelot."
"What is your quest?" = "To seek the Holy Grail."
"Color?" = "{color}"
"""


def wait_equal(get: Callable[[], object], expected: object, timeout: float = 10.0,
               what: str = "value") -> None:
    """Poll until get() == expected; on timeout say what was seen last."""
    seen: list[object] = [None]

    def same() -> bool:
        seen[0] = get()
        return seen[0] == expected
    try:
        wait_for(same, timeout, what)
    except AssertionError as e:
        raise AssertionError(f"{e}:\n  last seen {seen[0]!r}\n  expected  {expected!r}") from None


# --- the --json schema, as the README documents it ----------------------------------------

class Opt:
    """This schema, or null."""

    def __init__(self, schema: object) -> None:
        self.schema = schema


class ListOf:
    def __init__(self, schema: object) -> None:
        self.schema = schema


class OneOf:
    """One of these exact values."""

    def __init__(self, *values: object) -> None:
        self.values = values


INT = int
NUM = (int, float)
ERRORS = {"unknown": INT, "too_long": INT, "not_ascii": INT, "timeouts": INT}
REFUSED = {"denied": INT, "per_client_limit": INT, "denied_open": INT}
ZERO_REFUSED = {"denied": 0, "per_client_limit": 0, "denied_open": 0}
PROXY = {"local": INT, "invalid": INT, "untrusted": INT, "timeout": INT}
ZERO_PROXY_COUNTERS = {"proxy_local": 0, "proxy_invalid": 0, "proxy_untrusted": 0, "proxy_timeout": 0}
RUNNING_SCHEMA = {
    "schema": OneOf(1),
    "state": OneOf("running"),
    "master": {"pid": INT, "generation": INT, "workers_target": INT, "uptime_s": NUM, "title": str,
               "cpu_seconds": NUM, "cpu_percent": NUM, "rss": INT, "uss": INT},
    "listeners": ListOf({"address": str, "role": OneOf("service", "metrics", "agent"), "accept_queue": INT}),
    "balancer": {"state": OneOf("ready", "drained", "stopping", "not_serving"), "drained": bool,
                 "agent": OneOf("ready 100%", "drain")},
    "reloads": {"count": INT, "failures": INT, "last": Opt(NUM), "last_ok": bool, "last_message": str,
                "pending": bool},
    "replaced": {"crashed": INT, "hung": INT, "recycled": INT},
    "workers": ListOf({
        "pid": INT, "number": INT, "generation": INT,
        "state": OneOf("starting", "serving", "draining", "stopping"),
        "uptime_s": NUM, "heartbeat_age_s": NUM, "connections": INT, "answered": INT, "answered_per_s": NUM,
        "accepted": INT, "errors": ERRORS, "refused": REFUSED, "proxy": PROXY, "bytes_in": INT,
        "bytes_out": INT, "recent_clients": ListOf(str), "cpu_seconds": NUM,
        "cpu_percent": NUM, "rss": INT, "uss": INT,
    }),
    "totals": {"connections": INT, "answered": INT, "answered_per_s": NUM, "accepted": INT, "errors": ERRORS,
               "refused": REFUSED, "proxy": PROXY, "bytes_in": INT, "bytes_out": INT},
}
NOT_RUNNING_KEYS = {"schema", "state", "problem", "pid_file"}


def schema_problems(value: object, schema: object, path: str = "$") -> list[str]:
    """Every way `value` departs from `schema` (documented fields; extra fields are allowed)."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{path}: an object expected, not {value!r}"]
        problems = []
        for key, sub in schema.items():
            if key not in value:
                problems.append(f"{path}.{key}: missing")
            else:
                problems += schema_problems(value[key], sub, f"{path}.{key}")
        return problems
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            return [f"{path}: a list expected, not {value!r}"]
        return [problem for i, item in enumerate(value)
                for problem in schema_problems(item, schema.schema, f"{path}[{i}]")]
    if isinstance(schema, Opt):
        return [] if value is None else schema_problems(value, schema.schema, path)
    if isinstance(schema, OneOf):
        return [] if value in schema.values and type(value) is type(schema.values[0]) else [
            f"{path}: one of {schema.values!r} expected, not {value!r}"]
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) and bool not in types:  # JSON true is no number
        return [f"{path}: {'/'.join(t.__name__ for t in types)} expected, not {value!r}"]
    if not isinstance(value, types):
        return [f"{path}: {'/'.join(t.__name__ for t in types)} expected, not {value!r}"]
    return []


def assert_running_schema(snap: dict[str, Any]) -> None:
    problems = schema_problems(snap, RUNNING_SCHEMA)
    assert problems == [], "\n".join(problems) + "\n" + json.dumps(snap, indent=1)[:3000]


# --- the master's Prometheus endpoint ----------------------------------------------------

METRICS_LINE = re.compile(r"\[(\d+)\] master: metrics on (http://\S+/metrics)$", re.M)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_url(d: Daemon, master: int) -> str:
    def url() -> str | None:
        found = [m.group(2) for m in METRICS_LINE.finditer(d.log()) if int(m.group(1)) == master]
        return found[-1] if found else None
    return wait_for(url, 10, f"master {master} to log its metrics address")  # type: ignore[return-value]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=scaled(5)) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_metrics(url: str, expected: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                 timeout: float = 10.0) -> Samples:
    """Scrape until every (name, labels) in `expected` has its value; the last scrape."""
    last: list[Samples] = [{}]

    def current() -> dict[tuple[str, tuple[tuple[str, str], ...]], float | None]:
        last[0] = scrape(url)
        return {key: value(last[0], key[0], **dict(key[1])) for key in expected}
    wait_equal(current, expected, timeout, "the metrics")
    return last[0]


def wait_refused(pid_file: Path | str, **expected: int) -> None:
    """Until status counts these refusals by cause."""
    def counted() -> bool:
        refused = status_json(pid_file)["totals"]["refused"]
        return all(refused[cause] == n for cause, n in expected.items())
    wait_for(counted, 10, f"status to count refusals {expected}")
