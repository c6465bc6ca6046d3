"""The soak benchmark's short mode: benchmarks/soak.py --minutes 3 must end RESULT: PASS.

Three minutes of mixed clients (retrying, slow, flooding, idle) while HUP, TTIN/TTOU, SIGKILLs,
max_requests recycling and USR2s (every second one to a broken release) go on; see
benchmarks/README.md.  It runs soak.py as a subprocess (it is a subreaper and stops everything it
started, also on failure).  Needs a C compiler (skipped otherwise) and `ss`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, scaled

SOAK = REPO / "benchmarks" / "soak.py"
LOADGEN_SRC = REPO / "benchmarks" / "c" / "loadgen.c"  # the repo's own C tools


@pytest.mark.slow
def test_three_minutes_of_chaos_lose_nothing_and_leak_nothing(tmp_path: Path) -> None:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: soak.py needs the C loadgen")
    if not LOADGEN_SRC.is_file():
        pytest.skip(f"no loadgen source at {LOADGEN_SRC}: soak.py needs the C loadgen")
    if not shutil.which("ss"):
        pytest.skip("no `ss` (iproute2): soak.py reads what a SIGKILLed worker held with it")
    out = tmp_path / "report"
    cmd = [sys.executable, str(SOAK), "--minutes", "3", "--out", str(out),
           "--build-dir", str(tmp_path / "build"), "--loadgen-src", str(LOADGEN_SRC.parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled(15 * 60))
    (tmp_path / "soak.out").write_text(proc.stdout + proc.stderr)  # the whole output, kept with the report
    tail = "\n".join(proc.stdout.splitlines()[-120:]) + proc.stderr[-3000:]
    assert "\nRESULT: PASS" in proc.stdout, tail
    assert proc.returncode == 0, tail
    assert (out / "report.md").is_file()
