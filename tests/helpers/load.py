"""tests/lancelot_load.py (closed-loop clients, every answer checked) in another network namespace,
driven line by line: "running" once every client was answered, "mark" for the counts so far, the
JSON summary at the end.  The process is killed and reaped on exit."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .talk import CheckedThread
from .timing import scaled

if TYPE_CHECKING:
    from sdsandbox import Sandbox

LOAD_CLIENT = Path(__file__).resolve().parent.parent / "lancelot_load.py"


def load_client_timeouts() -> list[str]:
    """lancelot_load.py's options for its timeouts (a connection and an answer; every client's first
    answer), scaled: the test's patience, not the behaviour under test."""
    return ["--timeout", f"{scaled(10):g}", "--start-timeout", f"{scaled(15):g}"]


class LoadClient:
    """A started lancelot_load.py (stdin, stdout and stderr pipes, text mode)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = CheckedThread(self._read, name="load client reader")
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.lines.put(line.rstrip("\n"))
        finally:
            self.lines.put("")  # EOF

    def line(self, timeout: float = 30.0) -> str:
        try:
            return self.lines.get(timeout=scaled(timeout))
        except queue.Empty:
            raise AssertionError(f"no output from the load client within {scaled(timeout):g}s") from None

    def mark(self) -> tuple[int, int]:
        """Answers and errors so far."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("mark\n")
        self.proc.stdin.flush()
        line = self.line()
        assert line.startswith("mark "), line
        answers, errors = map(int, line.split()[1:])
        return answers, errors

    def answers(self) -> int:
        return self.mark()[0]

    def finish(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        summary = self.line()
        assert self.proc.wait(scaled(30)) == 0, self.proc.stderr.read() if self.proc.stderr else ""
        self.reader.finish()
        return json.loads(summary)

    def __enter__(self) -> LoadClient:
        try:
            first = self.line()
            assert first == "running", f"load client: {first!r}"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(scaled(30))
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def sandbox_load(sb: Sandbox, persistent: int = 8, per_request: int = 8) -> LoadClient:
    """lancelot_load.py in a systemd sandbox's network (sdsandbox.Sandbox), asking on port 1060."""
    return LoadClient(sb.net_popen(
        [sys.executable, str(LOAD_CLIENT), "--port", "1060", "--persistent", str(persistent),
         "--per-request", str(per_request), *load_client_timeouts()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
