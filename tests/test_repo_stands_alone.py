"""Issue 21, items 7 and 8: the repository stands alone.

Nothing in it points outside: no contract kept elsewhere (the protocol and the promises are
docs/PROTOCOL.md and docs/PROMISES.md), no tool in a folder beside the clone.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from helpers import REPO, scaled

OUTSIDE = re.compile(r"\.\./shared|shared/tools|SPEC\.md|\bSPEC §")


def files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        return [REPO / name for name in listed.stdout.splitlines() if (REPO / name).is_file()]
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)]


def test_nothing_points_outside_the_repository():
    me = Path(__file__).resolve()
    found = []
    for path in files():
        if path.resolve() == me or path.suffix in (".png", ".gz"):
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        found += [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
                  for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, "\n".join(found)


def test_the_contract_pages_exist_and_are_linked():
    readme = (REPO / "README.md").read_text()
    for page in ("docs/PROTOCOL.md", "docs/PROMISES.md"):
        assert (REPO / page).is_file()
        assert page in readme


def test_the_benchmark_tools_build_from_the_clone(tmp_path):
    """What bench.py, report.py and hostile.py build: the repo's own C sources, with cc."""
    import shutil
    import sys

    import pytest

    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc)")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert bench.DEFAULT_LOADGEN_SRC == REPO / "benchmarks" / "c"
    loadgen, ref = bench.build(bench.DEFAULT_LOADGEN_SRC, tmp_path)
    usage = subprocess.run([str(loadgen), "-h"], capture_output=True, text=True, timeout=scaled(10))
    assert usage.returncode == 2 and "connect-per-request" in usage.stderr
    assert ref.is_file()
