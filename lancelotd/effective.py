"""`lancelotd check-config --print` (-T): the effective configuration as TOML.

Like `nginx -T` or `php-fpm -tt`: every setting with the value the daemon would run with, the
defaults included, and where it came from as a comment (the file, the command line, the
default).  The output is itself a complete config: check-config accepts it and gives the same
Config (the test reads it back).
"""

from __future__ import annotations

import json
import math
from typing import Any

from .config import SETTINGS, Config

OPTIONS = {"bind": "--bind", "workers": "--workers", "pid_file": "--pid-file", "log_file": "--log-file",
           "log_level": "--log-level"}  # the command line's overrides (cli.py)


def toml_value(value: Any) -> str:
    """A TOML literal for the values a Config holds: str, bool, int, float, lists of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "0.0"
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes (\" \\ \n \uXXXX) are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def source(table: str, key: str, name: str, data: dict[str, Any], given: dict[str, Any]) -> str:
    if name in given:
        return f"command line ({OPTIONS.get(name, name)})"
    if isinstance(data.get(table), dict) and key in data[table]:
        raw = data[table][key]
        return "file" + (f" ({toml_value(raw)})" if raw == "auto" else "")
    return "default"


def render(cfg: Config, data: dict[str, Any], given: dict[str, Any]) -> str:
    """The TOML text of `cfg`; `data` is the file as parsed ({} for none), `given` the command
    line's options that were set (name -> value)."""
    path = cfg.path or "built-in defaults"
    lines = [f"# lancelotd: the effective configuration; file: {path}",
             "# (check-config --print: each value says where it came from: file, command line or default)"]
    tables: dict[str, list[tuple[str, str]]] = {}
    for (table, key), (name, _) in SETTINGS.items():
        tables.setdefault(table, []).append((key, name))  # one header per table, whatever the order
    for table, key, name in ((t, k, n) for t, pairs in tables.items() for k, n in pairs):
        if not lines[-1].startswith(f"[{table}]") and f"[{table}]" not in lines:
            lines += ["", f"[{table}]"]
        value = getattr(cfg, name)
        origin = source(table, key, name, data, given)
        if name == "bind" and not value:
            lines.append(f"# bind: none, only the [[listener]] tables' addresses ({origin})")
            continue
        lines.append(f"{key} = {toml_value(value)}  # {origin}")
    for i, listener in enumerate(cfg.listeners):
        lines += ["", f"[[listener]]  # file, listener[{i}]", f"bind = {toml_value(listener.bind)}",
                  f"proxy_protocol = {toml_value(listener.proxy_protocol)}"]
        if listener.proxy_protocol:
            lines.append(f"proxy_protocol_from = {toml_value(listener.proxy_protocol_from)}")
        if listener.bind.startswith("unix:"):  # its file: mode, owner, group
            lines.append(f'mode = "{listener.mode:04o}"')
            lines += [f"{name} = {toml_value(value)}" for name, value in
                      (("owner", listener.owner), ("group", listener.group)) if value]
    origin = "file" if "answers" in data else "default"
    lines += ["", f"[answers]  # {origin}"]
    lines += [f"{json.dumps(question)} = {json.dumps(answer)}" for question, answer in cfg.answers.items()]
    return "\n".join(lines) + "\n"
