#!/usr/bin/env python3
"""What the scoreboard costs on the worker's hot path.

Runs two lancelotd servers side by side, 2 workers each: this checkout as
it is, and a copy of it whose hot loop does not count (the per-request
answered/bytes counters removed; everything else the same), and alternates
loadgen runs against them (A B A B ...), 50 persistent connections by default.
Prints each run, the medians and their ratio.  Uses bench.py beside it
(run it as a script: python benchmarks/scoreboard_cost.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import (
    REPO,
    BenchError,
    Load,
    become_subreaper,
    build,
    median,
    raise_nofile,
    run_loadgen,
    say,
    start_lancelotd,
    stop_servers,
)

# The lines of worker.py's hot loop that feed the scoreboard (and their per-batch folds).
COUNTING_LINES = (
    "                bytes_in += len(data)\n",
    "                    answered += 1\n",
    "                    answered += out.count(b\".\") - must_close  # an error line is no answer\n",
    "                bytes_out += len(out)\n",
    "            self.answered += answered\n",
    "            self.bytes_in += bytes_in\n",
    "            self.bytes_out += bytes_out\n",
)


def without_counting(dest: Path) -> Path:
    """A copy of the package whose hot loop does not count."""
    shutil.copytree(REPO / "lancelotd", dest / "lancelotd")
    worker = dest / "lancelotd" / "worker.py"
    text = worker.read_text()
    for line in COUNTING_LINES:
        if line not in text:
            raise BenchError(f"worker.py changed: cannot find {line.strip()!r}; update COUNTING_LINES")
        text = text.replace(line, "")
    worker.write_text(text)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loadgen-src", type=Path, default=REPO.parent / "shared" / "tools" / "loadgen")
    parser.add_argument("--build-dir", type=Path, default=Path("/tmp/lancelotd-bench"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--conns", type=int, default=50)
    args = parser.parse_args(argv)
    raise_nofile()
    become_subreaper()
    loadgen, _ = build(args.loadgen_src, args.build_dir)
    servers: list = []
    procs: list[subprocess.Popen] = []
    commands: list[str] = []
    load = Load(f"{args.conns} persistent", args.conns, False)
    rps: dict[str, list[float]] = {"counting": [], "not counting": []}
    with tempfile.TemporaryDirectory(prefix="lancelotd-nocount-") as tmp:
        variants = {"counting": REPO, "not counting": without_counting(Path(tmp))}
        try:
            running = {}
            for name, source in variants.items():
                run_dir = args.build_dir / f"cost-{name.replace(' ', '-')}"
                run_dir.mkdir(parents=True, exist_ok=True)
                os.chdir(source)  # `python -m` imports from the working directory first
                running[name] = start_lancelotd([sys.executable, "-m", "lancelotd", "serve"], run_dir, 30,
                                                servers)
                say(f"# {name}: lancelotd from {source / 'lancelotd'}")
            os.chdir(REPO)
            for round_ in range(1, args.rounds + 1):
                for name, server in running.items():
                    result = run_loadgen(loadgen, server.port, load, args, f"{name}-round{round_}".replace(
                        " ", "-"), commands, procs)
                    if result.get("errors"):
                        raise BenchError(f"{name}: errors in round {round_}: {result}")
                    rps[name].append(result["rps"])
        except BenchError as e:
            say(f"FAIL: {e}")
            return 1
        finally:
            stop_servers(servers)
    with_, without = median(rps["counting"]), median(rps["not counting"])
    say("")
    for name, values in rps.items():
        runs = ", ".join(f"{v:.0f}" for v in values)
        say(f"  {name:13s} median {median(values):9.0f} answers/s  runs {runs}")
    say(f"  counting / not counting = {with_ / without:.3f} ({(with_ / without - 1) * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
