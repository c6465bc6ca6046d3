"""The C load generator (../shared/tools/loadgen) for the integration tests.

`build()` compiles it into a directory (skipping the test when there is no
source or no C compiler); `load()` runs it in the background for the length
of a `with` block and fills in its result line.  Tests get it through
`build()` in conftest's session-scoped `loadgen` fixture, so it is built once per run.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import scaled

LOADGEN_SRC = Path(__file__).resolve().parents[2] / "shared" / "tools" / "loadgen" / "loadgen.c"


def build(directory: Path) -> Path:
    """Compile loadgen into `directory`; the executable."""
    if not LOADGEN_SRC.exists():
        pytest.skip(f"loadgen source not found at {LOADGEN_SRC}")
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang) to build loadgen")
    exe = directory / "loadgen"
    built = subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(LOADGEN_SRC)],
                           capture_output=True, text=True)
    assert built.returncode == 0, f"building loadgen failed:\n{built.stderr}"
    return exe


@contextmanager
def load(exe: Path, port: int, conns: int = 50, seconds: float = 3.0, per_request: bool = False,
         threads: int = 1) -> Iterator[dict[str, str]]:
    """Run loadgen in the background; on exit from the block, wait for it and fill in its results."""
    cmd = [str(exe), "-H", "127.0.0.1", "-p", str(port), "-c", str(conns), "-d", str(seconds),
           "-t", str(threads)]
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
