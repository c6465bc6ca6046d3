#!/usr/bin/env python3
"""A benchmark report with pictures: lancelotd and the C reference over a range of connection counts.

For each connection count and client kind (persistent, connect-per-request) it alternates loadgen
runs against lancelotd (2 workers) and ref_epoll (1 process), as bench.py does, and writes
`report.md` with the medians and PNG plots of answers/s and p99 latency against connections (one
line per server) into --out.  Also samples each lancelotd worker's USS in the middle of every
persistent run.  The control (unless --no-control), ref_epoll with 2 processes, runs in the same
rounds: C in lancelotd's shape, see bench.py.  With uvloop installed (the `bench` extra), uvloop-x2
(peer_asyncio.py: an asyncio Protocol on uvloop in 2 processes) runs in them too.  See README.md.

Needs psutil, cc, and matplotlib (the `bench` extra: pip install -e '.[bench]'); run it as a script
with lancelotd importable.  Only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import psutil
from bench import (
    DEFAULT_LOADGEN_SRC,
    MIB,
    REPO,
    BenchError,
    Load,
    Server,
    become_subreaper,
    build,
    raise_nofile,
    reap_leftovers,
    run_loadgen,
    say,
    start_forking,
    start_lancelotd,
    start_ref,
    stop_process,
)

FULL_CONNS = [1, 10, 50, 200, 1000, 2000, 10000]
QUICK_CONNS = [1, 50, 2000, 10000]
FULL_CPR = [1, 10, 50, 200]
QUICK_CPR = [1, 50]
UVLOOP = "uvloop-x2"
SERVERS = ["lancelotd", "ref_epoll", "ref_epoll-2", UVLOOP]  # less --no-control's, and uvloop's without it


def start_uvloop(run_dir: Path, servers: list[Server]) -> Server:
    """The peer users compare with: an asyncio Protocol on uvloop in 2 processes (peer_asyncio.py)."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "peer_asyncio.py"), "--loop", "uvloop"]
    return start_forking(UVLOOP, cmd, run_dir, servers, 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conns", help="persistent connection counts, comma-separated "
                   f"(default {','.join(map(str, FULL_CONNS))}; --quick {','.join(map(str, QUICK_CONNS))})")
    p.add_argument("--cpr-conns", help="connect-per-request client counts "
                   f"(default {','.join(map(str, FULL_CPR))}; --quick {','.join(map(str, QUICK_CPR))}); "
                   "'' for none")
    p.add_argument("--rounds", type=int, help="A/B rounds per point (default 3, --quick 1)")
    p.add_argument("--duration", type=int, help="measured seconds per run (default 3, --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up seconds per run (default 1)")
    p.add_argument("--quick", action="store_true", help="fewer points, one round: about 1 minute")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "report",
                   help="where report.md and the PNGs go (default benchmarks/report)")
    p.add_argument("--loadgen-src", type=Path, default=DEFAULT_LOADGEN_SRC)
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/lancelotd-bench"))
    p.add_argument("--lancelotd-cmd", default=shlex.join([sys.executable, "-m", "lancelotd", "serve"]))
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="do not run the control, ref_epoll with 2 processes, in the same rounds")
    p.add_argument("--start-timeout", type=float, default=20.0)
    p.add_argument("--grace", type=float, default=10.0)
    args = p.parse_args(argv)
    quick = args.quick
    args.conns = _counts(args.conns, QUICK_CONNS if quick else FULL_CONNS)
    args.cpr_conns = _counts(args.cpr_conns, QUICK_CPR if quick else FULL_CPR)
    args.rounds = args.rounds or (1 if quick else 3)
    args.duration = args.duration or (2 if quick else 3)
    return args


def _counts(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return default
    return [int(x) for x in text.split(",") if x.strip()]


def worker_uss(server: Server) -> list[tuple[int, int]]:
    """(USS, open descriptors) of each worker: its memory, and roughly its share of the connections."""
    out = []
    for p in server.extra:
        try:
            out.append((p.memory_full_info().uss, p.num_fds()))
        except psutil.Error:
            out.append((0, 0))
    return out


def measure(loadgen: Path, server: Server, load: Load, args: argparse.Namespace, label: str,
            commands: list[str], procs: list[subprocess.Popen]) -> dict:
    """One loadgen run; lancelotd's worker USS is sampled halfway through the measured part."""
    sampled: list[tuple[int, int]] = []
    timer = None
    if server.extra:
        timer = threading.Timer(args.warmup + args.duration / 2, lambda: sampled.extend(worker_uss(server)))
        timer.start()
    try:
        result = run_loadgen(loadgen, server.port, load, args, label, commands, procs)
    finally:
        if timer:
            timer.cancel()
    result["uss"] = sampled
    return result


def run_point(loadgen: Path, servers: dict[str, Server], load: Load, args: argparse.Namespace,
              commands: list[str], procs: list[subprocess.Popen]) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in SERVERS}
    for rnd in range(1, args.rounds + 1):
        for name in SERVERS if rnd % 2 else reversed(SERVERS):  # no server always goes first
            label = f"{name}-c{load.conns}{'-cpr' if load.cpr else ''}-round{rnd}"
            runs[name].append(measure(loadgen, servers[name], load, args, label, commands, procs))
        for s in servers.values():
            if s.proc.poll() is not None:
                raise BenchError(f"{s.name} died during the load; see {s.log}")
    point: dict = {"conns": load.conns, "cpr": load.cpr, "loadavg": os.getloadavg()[0]}
    for name, rs in runs.items():
        point[name] = {
            "rps": statistics.median(r["rps"] for r in rs),
            "p99_us": statistics.median(r.get("p99_us", 0) for r in rs),
            "errors": sum(max(r["errors"], 0) for r in rs) + sum("failed" in r for r in rs),
            "starved": sum(r.get("starved", 0) for r in rs),
            "uss": max((r["uss"] for r in rs if r["uss"]), default=[], key=lambda u: sum(x[0] for x in u)),
        }
    ratios = [a["rps"] / b["rps"] for a, b in zip(runs["lancelotd"], runs["ref_epoll"], strict=True)
              if b["rps"] > 0]
    point["ratio"] = statistics.median(ratios) if ratios else 0.0
    say(f"  -> c={load.conns}{' cpr' if load.cpr else ''}: ratio {point['ratio']:.3f}, "
        + ", ".join(f"{name} {point[name]['rps']:.0f}/s p99 {point[name]['p99_us']} us" for name in SERVERS))
    return point


def plot(points: list[dict], key: str, ylabel: str, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    xs = [p["conns"] for p in points]
    for name, style in zip(SERVERS, ("o-", "s--", "^:", "d-."), strict=False):
        ax.plot(xs, [p[name][key] / (1000 if key == "p99_us" else 1) for p in points], style, label=name)
    ax.set_xscale("log")
    if key == "p99_us":
        ax.set_yscale("log")
    ax.set_xlabel("connections")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


CONTROL_TEXT = (" and the control, ref_epoll-2, 2 processes: C in lancelotd's shape, whose ratio to "
                "ref_epoll is what that shape costs here (2 busy server processes sharing the cores "
                "with the load generator)")


def _over(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def write_report(out: Path, points: list[dict], args: argparse.Namespace, meta: dict,
                 commands: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    control = "ref_epoll-2" in SERVERS
    control_text = CONTROL_TEXT if control else ""
    uvloop = UVLOOP in SERVERS
    lines = [
        "# lancelotd against the C reference",
        "",
        f"Generated {meta['date']} by `benchmarks/report.py {shlex.join(meta['argv'])}` at commit "
        f"`{meta['commit']}`{meta['dirty']}: {meta['cpus']} CPUs ({meta['cpu_model']}), "
        f"Python {meta['python']}, {meta['kernel']}; load "
        f"average {meta['load_before']:.2f} before, {meta['load_after']:.2f} after. lancelotd runs 2 "
        f"workers, ref_epoll 1 process{control_text}"
        + (f"; {UVLOOP} is an asyncio Protocol on uvloop in 2 processes (benchmarks/peer_asyncio.py)"
           if uvloop else "") + f"; each point is the median of {args.rounds} "
        f"alternating run(s) of {args.duration} s (after {args.warmup} s warm-up). The machine may be "
        "shared: the ratio of two "
        "runs side by side is the figure to trust, not the absolute numbers. Worker USS: sampled halfway "
        "through each persistent run (the largest round); in brackets the worker's open descriptors, "
        "about its share of the connections + 10.",
        "",
    ]
    for cpr, title in ((False, "persistent connections"), (True, "connect-per-request clients")):
        pts = [p for p in points if p["cpr"] == cpr]
        if not pts:
            continue
        stem = "cpr" if cpr else "persistent"
        plot(pts, "rps", "answers/s", f"answers/s, {title}", out / f"{stem}-rps.png")
        plot(pts, "p99_us", "p99 latency (ms)", f"p99 latency, {title}", out / f"{stem}-p99.png")
        lines += [
            f"## {title.capitalize()}", "",
            f"![answers/s]({stem}-rps.png) ![p99]({stem}-p99.png)", "",
            "| connections | lancelotd answers/s | ref_epoll answers/s | ratio | lancelotd p99 (us) "
            "| ref_epoll p99 (us) | p99 ratio | errors (lancelotd/ref) | worker USS MiB (fds) | load avg |"
            + (" ref_epoll-2 answers/s (/ ref) | ref_epoll-2 p99 (us) (/ ref) |" if control else "")
            + (f" {UVLOOP} answers/s (lancelotd / it) | {UVLOOP} p99 (us) |" if uvloop else ""),
            "|---:|---:|---:|---:|---:|---:|---:|---|---|---:|" + ("---:|---:|" if control else "")
            + ("---:|---:|" if uvloop else ""),
        ]
        for p in pts:
            a, b = p["lancelotd"], p["ref_epoll"]
            uss = ", ".join(f"{u / MIB:.1f} ({fds})" for u, fds in a["uss"]) or "-"
            line = (f"| {p['conns']} | {a['rps']:.0f} | {b['rps']:.0f} | {p['ratio']:.3f} | "
                    f"{a['p99_us']:.0f} | {b['p99_us']:.0f} | {_over(a['p99_us'], b['p99_us'])} | "
                    f"{a['errors']}/{b['errors']} | {uss} | {p['loadavg']:.1f} |")
            if "ref_epoll-2" in p:
                c = p["ref_epoll-2"]
                line += (f" {c['rps']:.0f} ({_over(c['rps'], b['rps'])}) | "
                         f"{c['p99_us']:.0f} ({_over(c['p99_us'], b['p99_us'])}) |")
            if UVLOOP in p:
                u = p[UVLOOP]
                line += f" {u['rps']:.0f} ({_over(a['rps'], u['rps'])}) | {u['p99_us']:.0f} |"
            lines.append(line)
        lines.append("")
    lines += ["## Commands", "", "```", *meta["server_cmds"], *commands, "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_dirty() -> str:
    """ " with uncommitted changes to lancelotd/" when the measured code is not the commit's."""
    try:
        changed = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "lancelotd"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return " with uncommitted changes to lancelotd/" if changed else ""


def cpu_model() -> str:
    """The machine's CPU, as /proc/cpuinfo names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:],
            "commit": git_commit(), "dirty": git_dirty(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
            "python": platform.python_version(),
            "kernel": f"Linux {platform.release()}", "load_before": os.getloadavg()[0]}
    servers: list[Server] = []
    loadgens: list[subprocess.Popen] = []
    commands: list[str] = []
    points: list[dict] = []
    become_subreaper()
    try:
        soft, _ = raise_nofile()
        biggest = max([*args.conns, *args.cpr_conns, 1])
        if soft < biggest * 2 + 100:
            say(f"# warning: RLIMIT_NOFILE {soft} may be too few for {biggest} connections")
        loadgen, ref_bin = build(args.loadgen_src.resolve(), args.build_dir)
        run_dir = args.build_dir / "report-run"
        run_dir.mkdir(parents=True, exist_ok=True)
        lancelotd = start_lancelotd(shlex.split(args.lancelotd_cmd), run_dir, args.start_timeout, servers)
        ref = start_ref(ref_bin, run_dir, args.start_timeout, servers)
        by_name = {"lancelotd": lancelotd, "ref_epoll": ref}
        if args.control:
            by_name["ref_epoll-2"] = start_ref(ref_bin, run_dir, args.start_timeout, servers, 2)
        else:
            SERVERS.remove("ref_epoll-2")
        if importlib.util.find_spec("uvloop") is not None:
            by_name[UVLOOP] = start_uvloop(run_dir, servers)
        else:
            say("# uvloop is not installed (pip install -e '.[bench]'): its line is left out")
            SERVERS.remove(UVLOOP)
        loads = [Load(f"{c} persistent", c, False) for c in args.conns]
        loads += [Load(f"{c} connect-per-request", c, True) for c in args.cpr_conns]
        for load in loads:
            say(f"\n== {load.name} ({args.rounds} round(s) of {args.duration} s)")
            points.append(run_point(loadgen, by_name, load, args, commands, loadgens))
        meta["server_cmds"] = [shlex.join(by_name[name].cmd) for name in SERVERS]
    except BenchError as e:
        say(f"\nERROR: {e}")
        return 1
    finally:
        for proc in loadgens:
            stop_process(proc, "loadgen", args.grace)
        known = []
        for server in reversed(servers):
            known.extend(server.extra)
            stop_process(server.proc, server.name, args.grace)
        reap_leftovers(known, args.grace)
    meta["load_after"] = os.getloadavg()[0]
    path = write_report(args.out, points, args, meta, commands)
    say(f"\n# report written to {path}")
    errors = sum(p[n]["errors"] for p in points for n in SERVERS)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
