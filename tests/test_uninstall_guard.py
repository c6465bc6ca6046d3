"""uninstall.sh runs `rm -rf "$PREFIX"`: it refuses a PREFIX it did not install (issue 19, item 8).

Each case must be refused before anything is touched (the script checks PREFIX first), so
these run on the host itself without a sandbox.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import scaled

SCRIPT = Path(__file__).resolve().parent.parent / "systemd" / "uninstall.sh"


@pytest.mark.parametrize("prefix", ["", "/", "//", "/opt", "opt/lancelotd", "/opt/../lancelotd",
                                    "/opt/lancelotd/..", "/usr/", "EXISTING"])
def test_uninstall_refuses_an_unexpected_prefix(prefix: str, tmp_path: Path) -> None:
    if prefix == "EXISTING":  # a directory install.sh did not make, named like one
        prefix = str(tmp_path / "lancelotd")
        os.mkdir(prefix)
        (Path(prefix) / "precious").write_text("keep me\n")
    result = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "PREFIX": prefix},
                            capture_output=True, text=True, timeout=scaled(30))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("uninstall.sh: "), result.stderr  # one line saying why
    assert "removed" not in result.stdout + result.stderr
    if prefix.startswith(str(tmp_path)):
        assert (Path(prefix) / "precious").exists()
