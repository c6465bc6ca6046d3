#!/usr/bin/env python3
"""lancelotd against the servers one would write instead, in one run: pinned and unpinned.

The servers, each with 2 processes (--processes) but the C reference (1, as in bench.py):
  lancelotd    this checkout, `lancelotd serve -w 2`
  uvloop-x2    peer_asyncio.py --loop uvloop: an asyncio Protocol on uvloop, 2 forked processes
               sharing one listener (skipped, with a note, if uvloop is not installed)
  asyncio-x2   peer_asyncio.py --loop asyncio: the same on the standard library's loop
  epoll-x2     floor_server.py: a bare epoll prefork server, no limits and no lifecycle
  C            ref_epoll (benchmarks/c/ref_epoll.c), 1 process
All answer the protocol correctly, pipelining included (peer_protocol.py).

For each mode (pinned: every server process on CPU 1, the load generator on CPU 0; unpinned: the
scheduler places everything) the servers are started afresh, then for each load every round runs
each server once, in an order that reverses from round to round.  Printed per load and server:
the median answers/s, the median p99, the median per-round ratio to C and of lancelotd to it,
and the CPU per answer: user + system time of the server's whole process tree over its runs
(warm-up included) divided by its answers (measured rate x run length).  For persistent loads,
also how each round's connections sat over the server's processes ("34/16", "50": all on one),
counted halfway through the run: two processes sharing one CPU, or a CPU with the load
generator, answer more when one of them holds every connection, so this split, which the
kernel and each server's accept loop decide afresh each round, moves the rate.

    python benchmarks/peers.py                 # 7 rounds, 3 s + 1 s warm-up, both modes
    python benchmarks/peers.py --modes unpinned --loads 50r --rounds 3
    python benchmarks/peers.py --processes 1 --loads 50    # per process, with no split to vary

uvloop: pip install -e '.[bench]'.  Only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import bench
import psutil
from ab import loads_from
from bench import REPO, BenchError, Load, Server, median, say

PYTHON_PEERS = ("uvloop", "asyncio", "epoll")  # named NAME-xN, N = --processes
SERVER_CPU, LOADGEN_CPU = 1, 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="pinned,unpinned", help="pinned, unpinned or both (default both)")
    bench.add_load_arguments(p, rounds=7)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--processes", type=int, default=2,
                   help="of each Python server (lancelotd's workers); 1 compares the servers with no "
                        "split of the connections to vary (default 2)")
    return p.parse_args(argv)


def start(name: str, ref_bin: Path, run_dir: Path, servers: list[Server], processes: int) -> Server:
    python = [sys.executable]
    if name == "lancelotd":
        return bench.start_lancelotd([*python, "-m", "lancelotd", "serve"], run_dir, 30, servers)
    if name == "C":
        server = bench.start_ref(ref_bin, run_dir, 30, servers)
        server.name = "C"
        return server
    if name.startswith("epoll-"):
        cmd = [*python, str(REPO / "benchmarks" / "floor_server.py")]
    else:
        cmd = [*python, str(REPO / "benchmarks" / "peer_asyncio.py"), "--loop", name.split("-")[0]]
    return bench.start_forking(name, cmd, run_dir, servers, processes)


def cpu_seconds(server: Server) -> float:
    total = 0.0
    for proc in bench.tree(server):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_mode(mode: str, names: list[str], loads: list[Load], args: argparse.Namespace, loadgen: Path,
             ref_bin: Path, commands: list[str]) -> dict:
    servers: list[Server] = []
    procs: list[subprocess.Popen] = []
    results: dict[str, dict[str, list[dict]]] = {}
    pinned = mode == "pinned"
    try:
        running = {}
        for name in names:
            run_dir = args.build_dir / f"peers-{name}"
            run_dir.mkdir(parents=True, exist_ok=True)
            running[name] = start(name, ref_bin, run_dir, servers, args.processes)
            if pinned:  # the children fork later than this (lancelotd's replacements) inherit it
                for proc in bench.tree(running[name]):
                    proc.cpu_affinity([SERVER_CPU])
        for load in loads:
            say(f"\n== {mode}: {load.name} ({args.rounds} rounds, {args.duration} s + {args.warmup} s)")
            rows = results.setdefault(load.name, {name: [] for name in names})
            for round_ in range(args.rounds):
                for name in names if round_ % 2 == 0 else list(reversed(names)):
                    server = running[name]
                    before = cpu_seconds(server)
                    label = f"{mode}-{name}-r{round_ + 1}"
                    result = bench.run_loadgen(loadgen, server.port, load, args, label, commands, procs,
                                               str(LOADGEN_CPU) if pinned else "",
                                               None if load.cpr else lambda s=server: bench.split(s))
                    result["cpu_s"] = cpu_seconds(server) - before
                    rows[name].append(result)
                dead = [name for name in names if running[name].proc.poll() is not None]
                if dead:
                    raise BenchError(f"{dead[0]} died during the load; see {running[dead[0]].log}")
        return {"servers": {name: shlex.join(running[name].cmd) for name in names},
                "loads": {load: summarize(rows, args) for load, rows in results.items()}}
    finally:
        for proc in procs:
            bench.stop_process(proc, "loadgen", 5)
        bench.stop_servers(servers)


def summarize(rows: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    ours, c = rows["lancelotd"], rows["C"]
    out = {}
    for name, runs in rows.items():
        answers = sum(r["rps"] for r in runs) * (args.duration + args.warmup) or 1
        out[name] = {
            "rps": median([r["rps"] for r in runs]),
            "p99_us": median([r.get("p99_us", 0) for r in runs]),
            "errors": sum(max(r["errors"], 0) for r in runs),
            "vs_c": median([r["rps"] / b["rps"] if b["rps"] else 0.0 for r, b in zip(runs, c, strict=True)]),
            "lancelotd_vs": median([a["rps"] / r["rps"] if r["rps"] else 0.0
                                    for a, r in zip(ours, runs, strict=True)]),
            "cpu_us_per_answer": sum(r["cpu_s"] for r in runs) / answers * 1e6,
            "splits": [r["split"] for r in runs if "split" in r],  # persistent loads: per round
        }
    return out


def say_mode(mode: str, figures: dict) -> None:
    say(f"\n== {mode}: medians over the rounds")
    for load, servers in figures["loads"].items():
        say(f"  {load}")
        for name, f in servers.items():
            say(f"    {name:<11} rps {f['rps']:>8.0f}  p99 {f['p99_us']:>7.0f} us  / C {f['vs_c']:.3f}  "
                f"lancelotd / it {f['lancelotd_vs']:.3f}  CPU/answer {f['cpu_us_per_answer']:6.2f} us  "
                f"errors {f['errors']}")
            if f["splits"]:
                say(f"    {'':<11} connections per process, by round: {'  '.join(f['splits'])}")
    names = list(next(iter(figures["loads"].values())))
    others = [n for n in names if n != "lancelotd"]
    say(f"\n  | load | {' | '.join(f'lancelotd / {n}' for n in others)} | p99 µs: {' · '.join(names)} "
        f"| CPU µs/answer: {' · '.join(names)} |")
    say("  |---|" + "---:|" * len(others) + "---|---|")
    for load, servers in figures["loads"].items():
        say(f"  | {load} | " + " | ".join(f"{servers[n]['lancelotd_vs']:.3f}" for n in others)
            + " | " + " · ".join(f"{servers[n]['p99_us']:.0f}" for n in names)
            + " | " + " · ".join(f"{servers[n]['cpu_us_per_answer']:.2f}" for n in names) + " |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench.raise_nofile()
    bench.WORKERS = args.processes  # lancelotd's
    names = ["lancelotd", *(f"{peer}-x{args.processes}" for peer in PYTHON_PEERS), "C"]
    if importlib.util.find_spec("uvloop") is None:
        say("# uvloop is not installed (pip install -e '.[bench]'): uvloop is left out")
        names.remove(f"uvloop-x{args.processes}")
    modes = args.modes.split(",")
    if "pinned" in modes and (os.cpu_count() or 1) < 2:
        say("# one CPU: the pinned mode needs two; left out")
        modes.remove("pinned")
    say(f"# {os.cpu_count()} CPUs; Python {sys.version.split()[0]}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (a quiet machine is needed: see README.md)")
    loadgen, ref_bin = bench.build(args.loadgen_src, args.build_dir)
    commands: list[str] = []
    report = {}
    try:
        for mode in modes:
            report[mode] = run_mode(mode, names, loads_from(args.loads), args, loadgen, ref_bin, commands)
    except BenchError as e:
        say(f"FAIL: {e}")
        return 1
    for mode, figures in report.items():
        say_mode(mode, figures)
    say("\n== servers")
    for name, cmd in next(iter(report.values()))["servers"].items():
        say(f"  {name}: {cmd}")
    say(f"  loadgen, e.g.: {commands[-1]}" if commands else "")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
