"""Issue 21, item 3: `lancelotd check-config --print` (-T), the effective configuration.

What it prints is a complete config: read back, it gives the same Config as the file with the
command line's options on top, and check-config accepts it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from helpers import lancelotd_cli

from lancelotd import config

FILE = """
[server]
bind = ["127.0.0.1:1060", "[::1]:1060"]
workers = "auto"
metrics_bind = "127.0.0.1:9106"

[protocol]
unknown_answer = "Ni \\"again\\"."
idle_timeout = 12.5

[access]
deny = ["10.0.0.13", "2001:db8::/32"]

[[listener]]
bind = "127.0.0.2:1070"
proxy_protocol = true
proxy_protocol_from = ["127.0.0.1"]

[[listener]]
bind = "unix:/run/lancelotd/test.sock"
mode = 0o600
group = "65534"

[log]
format = "json"
access = "stderr"

[answers]
"What is your name?" = "Arthur, King of the Britons."
"  Why?  " = "Because."
"""


def same(a: config.Config, b: config.Config) -> None:
    assert dataclasses.replace(a, path="") == dataclasses.replace(b, path="")


def printed(tmp_path: Path, *args: str) -> tuple[str, Path]:
    result = lancelotd_cli("check-config", "--print", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "effective.toml"
    out.write_text(result.stdout)
    return result.stdout, out


def test_print_round_trips_with_sources(tmp_path):
    original = tmp_path / "lancelotd.toml"
    original.write_text(FILE)
    text, out = printed(tmp_path, "-c", str(original), "-w", "3", "--log-level", "debug")
    expected = config.load(str(original)).with_overrides(workers=3, log_level="debug",
                                                         pid_file=config.default_pid_file())
    same(config.load(str(out)), expected)
    assert lancelotd_cli("check-config", "-c", str(out)).stdout == "ok\n"
    lines = {line.split(" = ")[0]: line for line in text.splitlines() if " = " in line}
    assert lines["workers"].endswith("# command line (--workers)")
    assert lines["level"].endswith("# command line (--log-level)")
    assert lines["idle_timeout"] == "idle_timeout = 12.5  # file"
    assert lines["backlog"] == "backlog = 4096  # default"
    assert "[[listener]]" in text and 'proxy_protocol_from = ["127.0.0.1"]' in text
    tomllib.loads(text)  # valid TOML, comments and all


def test_print_of_the_defaults_and_of_the_shipped_file(tmp_path):
    for args in ((), ("-c", str(Path(__file__).resolve().parents[1] / "etc/lancelotd.toml"))):
        text, out = printed(tmp_path, *args)
        want = config.load(args[1]) if args else config.Config()
        same(config.load(str(out)), want)
        assert "[answers]" in text


def test_print_with_listeners_only(tmp_path):
    original = tmp_path / "lancelotd.toml"
    original.write_text('[[listener]]\nbind = "127.0.0.1:1070"\n')
    text, out = printed(tmp_path, "-c", str(original))
    assert "# bind: none, only the [[listener]] tables' addresses" in text
    same(config.load(str(out)), config.load(str(original)))


def test_print_of_an_invalid_file_is_its_problems(tmp_path):
    original = tmp_path / "lancelotd.toml"
    original.write_text("[server]\nworkers = 0\n")
    result = lancelotd_cli("check-config", "-T", "-c", str(original))
    assert result.returncode == 1 and result.stdout == "" and "server.workers" in result.stderr
