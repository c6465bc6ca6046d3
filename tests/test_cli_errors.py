"""Issue 21, item 2: the CLI never shows a traceback, and never says "not running" about a master
it could not look for.

- An invalid config (-c FILE) leaves the PID file's path unknown: status, reload, stop,
  reopen-logs say so and exit 6 (LSB "program is not configured"); the master serves on.
- A caller who may not signal the master (another user's; here the daemon runs as root and the
  command as nobody, through setpriv as test_fresh_start.py does) gets one line naming what was
  refused and what to run instead, and exit 4 (LSB "insufficient privilege").
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import NAME_A, as_user, lancelotd_cli, scaled

BROKEN = "workers = 0\n"  # [server] workers must be 1..256


def config(pid_file: str) -> str:
    return f'[server]\npid_file = "{pid_file}"\nworkers = 1\n'


@pytest.fixture
def configured(start_daemon):
    d = start_daemon(config=config(""), workers=1)
    d.config_file.write_text(config(str(d.pid_file)))  # the file names the PID file the daemon uses
    return d


@pytest.mark.parametrize("command", ["status", "reload", "stop", "reopen-logs"])
def test_invalid_config_is_said_as_such(configured, command):
    d = configured
    assert lancelotd_cli("status", "-c", str(d.config_file)).returncode == 0  # valid: found
    d.config_file.write_text(config(str(d.pid_file)).replace("workers = 1\n", BROKEN))
    result = lancelotd_cli(command, "-c", str(d.config_file))
    assert result.returncode == 6, result
    assert "server.workers" in result.stderr and "the config is invalid" in result.stderr, result.stderr
    assert "not running" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert d.proc.poll() is None and d.ask("What is your name?") == NAME_A  # nothing was signalled


def test_invalid_config_status_json(configured):
    d = configured
    d.config_file.write_text(BROKEN)
    result = lancelotd_cli("status", "--json", "-c", str(d.config_file))
    assert result.returncode == 6
    assert json.loads(result.stdout)["state"] == "not_configured"


def test_invalid_config_with_pid_file_still_stops(configured):
    d = configured
    d.config_file.write_text(BROKEN)
    result = lancelotd_cli("stop", "-c", str(d.config_file), "--pid-file", str(d.pid_file),
                           "--timeout", f"{scaled(20):g}")
    assert result.returncode == 0, result
    assert d.wait_exit(20) == 0


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the daemon runs as root and the command as nobody")
    return lancelotd_cli(*args, prefix=as_user())


@pytest.mark.parametrize(("command", "signame"), [("reload", "SIGHUP"), ("stop", "SIGTERM"),
                                                  ("reopen-logs", "SIGUSR1")])
def test_signal_refused_is_one_line_with_what_to_do(start_daemon, command, signame):
    d = start_daemon(workers=1)
    os.chmod(d.tmp, 0o755)  # nobody may read the PID file, the start record and the scoreboard
    result = as_nobody(command, "--pid-file", str(d.pid_file))
    if "not allowed to read" in result.stderr:  # this interpreter needs no capability: the files stay hidden
        assert result.returncode == 4 and "sudo lancelotd" in result.stderr, result
        return
    assert result.returncode == 4, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"not allowed to send {signame} to master {d.proc.pid}" in lines[0], lines
    assert "it runs as root, you are nobody" in lines[0] and f"sudo lancelotd {command}" in lines[0], lines
    assert d.proc.poll() is None and d.ask("What is your name?") == NAME_A


def test_status_of_another_users_master_says_what_it_cannot_see(start_daemon):
    d = start_daemon(workers=1)
    os.chmod(d.tmp, 0o755)
    result = as_nobody("status", "--pid-file", str(d.pid_file))
    assert "Traceback" not in result.stderr and "not running" not in result.stderr, result
    if result.returncode == 0:
        assert "listening: ? (not allowed to read /proc/" in result.stdout, result.stdout
    else:
        assert result.returncode == 4 and "not allowed to read" in result.stderr, result
