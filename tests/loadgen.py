"""The load generator for the integration tests: the C loadgen, or its Python twin.

`build()` compiles the repo's benchmarks/c/loadgen.c into a directory and returns the
command that runs it; where a C compiler is missing, or when LANCELOTD_TEST_PYLOAD=1
asks for it, it returns the command of tests/pyload.py, which takes the same options
and prints the same result line (the slower generator).  `load()` runs the
command in the background for the length of a `with` block and fills in its result
line.  conftest's session-scoped `loadgen` fixture builds it once per run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import scaled

LOADGEN_SRC = Path(__file__).resolve().parents[1] / "benchmarks" / "c" / "loadgen.c"
PYLOAD = [sys.executable, str(Path(__file__).resolve().with_name("pyload.py"))]


def build(directory: Path) -> list[str]:
    """The load generator's command: loadgen compiled into `directory`, else pyload.py."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if os.environ.get("LANCELOTD_TEST_PYLOAD") == "1" or not LOADGEN_SRC.exists() or cc is None:
        return PYLOAD
    exe = directory / "loadgen"
    built = subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(LOADGEN_SRC)],
                           capture_output=True, text=True)
    assert built.returncode == 0, f"building loadgen failed:\n{built.stderr}"
    return [str(exe)]


@contextmanager
def load(command: list[str], port: int, conns: int = 50, seconds: float = 3.0, per_request: bool = False,
         threads: int = 1) -> Iterator[dict[str, str]]:
    """Run the load generator in the background; on exit from the block, wait for it and fill in
    its results."""
    cmd = [*command, "-H", "127.0.0.1", "-p", str(port), "-c", str(conns), "-d", str(seconds),
           "-t", str(threads), "-T", f"{scaled(2.0) * 1000:g}"]  # a request's timeout: the test's patience
    if per_request:
        cmd.append("-r")
    result: dict[str, str] = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield result
        out, err = proc.communicate(timeout=scaled(seconds + 15))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"loadgen exited with {proc.returncode}: {out}{err}"
    lines = [line for line in out.splitlines() if "errors=" in line]
    assert lines, f"no result line from loadgen: {out!r} {err!r}"
    result.update(kv.split("=", 1) for kv in lines[-1].split() if "=" in kv)


def assert_no_errors(result: dict[str, str]) -> None:
    line = " ".join(f"{k}={v}" for k, v in result.items())
    assert result["errors"] == "0", line
    assert int(result["requests"]) > 0, line
