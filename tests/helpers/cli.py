"""lancelotd's commands and the `lancelot` client, run to their end as an operator runs them."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from .timing import scaled

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # where the console scripts of this interpreter are
ROOT = os.geteuid() == 0
NOBODY = 65534


def clean_env() -> dict[str, str]:
    """Our environment without LANCELOTD_CONFIG (a developer's own must not leak into a test)."""
    env = dict(os.environ)
    env.pop("LANCELOTD_CONFIG", None)
    return env


def lancelotd_cli(*args: str, timeout: float = 30, cwd: Path = REPO,
                  prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """`lancelotd ARGS...` run to its end (within scaled(`timeout`)), its output captured; from the
    checkout by default (its package first on the path), through `prefix` if given (as_user())."""
    return subprocess.run([*prefix, sys.executable, "-m", "lancelotd", *args], capture_output=True, text=True,
                          timeout=scaled(timeout), env=clean_env(), stdin=subprocess.DEVNULL, cwd=cwd)


def lancelot_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """`lancelot ARGS...` (the client's console script, else its main()) run to its end."""
    script = BIN / "lancelot"
    if script.exists():
        cmd = [str(script), *args]
    else:
        cmd = [sys.executable, "-c", "import sys; from lancelotd.client import main; sys.exit(main())", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=scaled(timeout), env=clean_env(),
                          stdin=subprocess.DEVNULL)


def status_json(pid_file: Path | str, timeout: float = 20) -> dict[str, Any]:
    """`lancelotd status --json`: the scoreboard as operators see it."""
    result = lancelotd_cli("status", "--json", "--pid-file", str(pid_file), timeout=timeout)
    assert result.returncode == 0, f"status --json exited {result.returncode}: {result.stdout}{result.stderr}"
    return json.loads(result.stdout)


def as_user() -> list[str]:
    """The command prefix that runs a process as the ordinary user of these tests (nobody when
    they run as root, through setpriv(1); skips the test where it is missing)."""
    if not ROOT:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("as root these tests run lancelotd as nobody through setpriv(1), which is missing")
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if not reachable_by_others(sys.executable):
        # This interpreter lives where nobody cannot go (a pyenv under /root): let it search
        # directories.  What is tested depends on the euid alone, not on this capability.
        drop += ["--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search"]
    return drop


def reachable_by_others(path: str) -> bool:
    real = Path(os.path.realpath(path))
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in real.parents) and bool(
        os.stat(real).st_mode & stat.S_IXOTH)
