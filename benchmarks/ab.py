#!/usr/bin/env python3
"""A/B/.../ref_epoll: several lancelotd variants and the C reference, side by side, alternating.

Each variant is SOURCE[:CONFIG]: SOURCE is a git revision of this repo (its
lancelotd/ is exported to a temporary directory) or "." for this checkout;
CONFIG is an optional config file given with -c (e.g. one that sets
spread_connections).  The variant "floor" is floor_server.py: the least a
Python prefork server can do per answer, with as many workers.  Every variant
and ref_epoll run at once, idle but for the one being measured; for each load,
each round runs every server once, in an order that reverses from round to
round.  Printed per load and server: the
median answers/s, p99, the median per-round ratio to ref_epoll with the
rounds, p99 as a multiple of ref_epoll's, errors, and the workers' user and
system CPU per answer (from /proc, over whole runs, warm-up included, divided
by the measured rate times the run's length).  For persistent loads with more
than one worker, also how the connections sat over the workers in each round
and that round's rate: on a machine whose CPUs the workers share, that
placement moves the rate more than most changes do, so compare variants
within it.

    python benchmarks/ab.py 530bd5e . .:spread.toml --rounds 7
    python benchmarks/ab.py . floor --rounds 7
    python benchmarks/ab.py 139b7eb . --workers 1 --pinned --loads 50

Uses bench.py beside it (run it as a script).  Only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import bench
import psutil
from bench import REPO, BenchError, Load, Server, median, say

SERVER_CPU, LOADGEN_CPU = 1, 0  # --pinned


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="SOURCE[:CONFIG]; SOURCE a git revision or '.'; or 'floor'")
    bench.add_load_arguments(p, rounds=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pinned", action="store_true",
                   help="every server process on CPU 1, the load generator on CPU 0 (as in peers.py)")
    return p.parse_args(argv)


def loads_from(text: str) -> list[Load]:
    loads = []
    for item in text.split(","):
        cpr = item.endswith("r")
        conns = int(item.rstrip("r"))
        loads.append(Load(f"{conns} {'connect-per-request' if cpr else 'persistent'}", conns, cpr))
    return loads


def export(source: str, into: Path) -> Path:
    """A directory holding that revision's lancelotd/ package."""
    if source == ".":
        return REPO
    archive = subprocess.run(["git", "-C", str(REPO), "archive", source, "lancelotd"],
                             capture_output=True, check=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def cpu(server: Server) -> tuple[float, float]:
    """User and system CPU seconds of the server's workers (or of ref_epoll itself)."""
    procs = server.extra or [psutil.Process(server.pid)]
    times = [p.cpu_times() for p in procs]
    return sum(t.user for t in times), sum(t.system for t in times)


def say_placement(rows: list[dict]) -> None:
    """Persistent loads: where the connections sat in each round, and that round's rate.  On a
    machine whose CPUs the workers share (with each other or the load generator), one worker
    holding every connection answers more than a split, whatever the code: compare variants
    within a placement."""
    rounds = [f"{r.get('split', '?')} {r['rps'] / 1000:.0f}k" for r in rows]
    say(f"  {'':<51} per round, connections per worker and answers/s: {'  '.join(rounds)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench.WORKERS = args.workers
    bench.raise_nofile()
    loadgen, ref_bin = bench.build(args.loadgen_src, args.build_dir)
    servers: list[Server] = []
    running: dict[str, Server] = {}
    commands: list[str] = []
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="lancelotd-ab-") as tmp:
        try:
            for i, variant in enumerate(args.variants):
                run_dir = args.build_dir / f"ab-{i}"
                run_dir.mkdir(parents=True, exist_ok=True)
                if variant == "floor":
                    running[f"{i}:floor"] = bench.start_forking(
                        "floor", [sys.executable, str(REPO / "benchmarks" / "floor_server.py")], run_dir,
                        servers, bench.WORKERS)
                    continue
                source, _, config = variant.partition(":")
                where = export(source, Path(tmp) / f"v{i}")
                # -P: import lancelotd from `where` (PYTHONPATH), not from the working directory
                serve = ["env", f"PYTHONPATH={where}", sys.executable, "-P", "-m", "lancelotd", "serve"]
                if config:
                    serve += ["-c", str(Path(config).resolve())]
                running[f"{i}:{variant}"] = bench.start_lancelotd(serve, run_dir, 30, servers)
            (args.build_dir / "ab-ref").mkdir(parents=True, exist_ok=True)
            running["ref_epoll"] = bench.start_ref(ref_bin, args.build_dir / "ab-ref", 30, servers)
            if args.pinned:  # children forked later (replacements) inherit it
                for server in running.values():
                    root = psutil.Process(server.pid)
                    for proc in [root, *root.children(recursive=True)]:
                        proc.cpu_affinity([SERVER_CPU])
            results: dict[tuple[str, str], list[dict]] = {}
            for load in loads_from(args.loads):
                say(f"\n== {load.name}")
                for round_ in range(args.rounds):
                    order = list(running) if round_ % 2 == 0 else list(reversed(running))
                    for name in order:
                        server = running[name]
                        before = cpu(server)
                        result = bench.run_loadgen(loadgen, server.port, load, args, f"{name}-r{round_ + 1}",
                                                   commands, procs, str(LOADGEN_CPU) if args.pinned else "",
                                                   None if load.cpr else lambda s=server: bench.split(s))
                        after = cpu(server)
                        result["cpu"] = (after[0] - before[0], after[1] - before[1])
                        results.setdefault((load.name, name), []).append(result)
            say("")
            for load in loads_from(args.loads):
                refs = results[(load.name, "ref_epoll")]
                ref_p99 = median([r.get("p99_us", 0) for r in refs])
                for name in running:
                    rows = results[(load.name, name)]
                    ratios = [a["rps"] / b["rps"] if b["rps"] else 0.0
                              for a, b in zip(rows, refs, strict=True)]
                    p99 = median([r.get("p99_us", 0) for r in rows])
                    # CPU covers warm-up too: count its answers at the measured rate
                    answers = sum(r["rps"] for r in rows) * (args.duration + args.warmup) or 1
                    user = sum(r["cpu"][0] for r in rows) / answers * 1e6
                    system = sum(r["cpu"][1] for r in rows) / answers * 1e6
                    say(f"  {load.name:<26} {name:<24} rps {median([r['rps'] for r in rows]):>9.0f}  "
                        f"p99 {p99:>7.0f} us (x{p99 / max(ref_p99, 1):.2f})  "
                        f"ratio {median(ratios):.3f} [{' '.join(f'{x:.2f}' for x in ratios)}]  "
                        f"errors {sum(max(r['errors'], 0) for r in rows)}  "
                        f"CPU/answer user {user:.2f} us, sys {system:.2f} us")
                    if not load.cpr and args.workers > 1 and name != "ref_epoll":
                        say_placement(rows)
        except BenchError as e:
            say(f"FAIL: {e}")
            return 1
        finally:
            bench.stop_servers(servers)
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
