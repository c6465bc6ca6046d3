#!/usr/bin/env python3
"""Benchmark lancelotd against the C reference server (ref_epoll) with the C load generator.

Runs lancelotd (2 workers) and ref_epoll (1 process) side by side on 127.0.0.1, alternates the
runs (A B A B ...) for three loads, and judges lancelotd by the median per-round ratio of its
answers per second to ref_epoll's.  Also measures the USS of each idle worker.  See README.md.

The control (on unless --no-control): ref_epoll with as many processes as lancelotd has workers,
run in the same rounds.  Its ratio to the 1-process ref_epoll is what that shape (N processes
sharing the machine with the load generator) costs a C server here, so the figures tell the cost
of the shape from the cost of Python.

Standalone: Python stdlib + psutil.  Only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HOST = "127.0.0.1"
WORKERS = 2
REPO = Path(__file__).resolve().parent.parent
DEFAULT_LOADGEN_SRC = REPO / "benchmarks" / "c"  # loadgen.c and ref_epoll.c: the repo's own
MIB = 1024 * 1024


@dataclass
class Load:
    name: str
    conns: int
    cpr: bool


LOADS = [
    Load("50 persistent", 50, False),
    Load("2000 persistent", 2000, False),
    Load("50 connect-per-request", 50, True),
]


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path
    cmd: list[str] = field(default_factory=list)
    pid: int = 0  # the serving (master) process, once ready
    extra: list[psutil.Process] = field(default_factory=list)  # e.g. lancelotd's workers


class BenchError(Exception):
    """Setup failed (build, start, readiness): no figures to judge."""


def say(*parts: object) -> None:
    print(*parts, flush=True)


# --- setup -------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def become_subreaper() -> bool:
    """Orphans of our servers (workers of a killed master) get reparented to us, so we reap them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def build(src_dir: Path, build_dir: Path) -> tuple[Path, Path]:
    """Compile loadgen and ref_epoll into build_dir unless they are already newer than the source."""
    build_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, flags in (("loadgen", ["-pthread"]), ("ref_epoll", [])):
        src = src_dir / f"{name}.c"
        binary = build_dir / name
        if not src.is_file():
            raise BenchError(f"missing source {src} (use --loadgen-src)")
        if binary.is_file() and os.access(binary, os.X_OK) and binary.stat().st_mtime >= src.stat().st_mtime:
            say(f"# {name}: already built at {binary}")
        else:
            tmp = build_dir / f".{name}.tmp{os.getpid()}"
            cmd = ["cc", "-O2", *flags, "-o", str(tmp), str(src)]
            say("$ " + shlex.join(cmd))
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise BenchError(f"building {name} failed:\n{res.stderr}")
            tmp.replace(binary)
        out.append(binary)
    return out[0], out[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_process(cmd: list[str], log: Path) -> subprocess.Popen:
    say("$ " + shlex.join(cmd) + f"   # output: {log}")
    with open(log, "wb") as f:
        # Own session: a Ctrl-C at the terminal reaches only us, and we stop the servers cleanly.
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until(server: Server, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(f"{server.name} exited with status {server.proc.returncode} before it was "
                             f"ready; its output:\n{tail(server.log)}")
        if ready():
            return
        time.sleep(0.05)
    raise BenchError(f"{server.name} not ready after {timeout:.0f} s; its output:\n{tail(server.log)}")


def start_lancelotd(base_cmd: list[str], run_dir: Path, timeout: float, servers: list[Server]) -> Server:
    port = free_port()
    pid_file = run_dir / "lancelotd.pid"
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    cmd = [*base_cmd, "-b", f"{HOST}:{port}", "-w", str(WORKERS), "--pid-file", str(pid_file)]
    log = run_dir / "lancelotd.log"
    server = Server("lancelotd", port, start_process(cmd, log), log, cmd)
    servers.append(server)  # stopped in main's finally, even if it never gets ready

    def pid_file_written() -> bool:
        try:
            text = pid_file.read_text().strip()
        except OSError:
            return False
        if text.isdigit() and psutil.pid_exists(int(text)):
            server.pid = int(text)
            return True
        return False

    def workers_up() -> bool:
        try:
            children = [p for p in psutil.Process(server.pid).children()
                        if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return False
        if len(children) >= WORKERS:
            server.extra = children
            return True
        return False

    wait_until(server, pid_file_written, timeout)
    wait_until(server, workers_up, timeout)
    return server


def start_ref(ref_bin: Path, run_dir: Path, timeout: float, servers: list[Server], procs: int = 1) -> Server:
    """ref_epoll with `procs` processes: named ref_epoll for 1, ref_epoll-N (the control) otherwise."""
    port = free_port()
    name = "ref_epoll" if procs == 1 else f"ref_epoll-{procs}"
    log = run_dir / f"{name}.log"
    cmd = [str(ref_bin), str(port), str(procs), HOST]
    server = Server(name, port, start_process(cmd, log), log, cmd)
    servers.append(server)

    def ready() -> bool:
        for line in tail(log, 50).splitlines():
            if line.startswith("READY"):
                server.pid = server.proc.pid
                return True
        return False

    wait_until(server, ready, timeout)
    return server


def start_forking(name: str, cmd: list[str], run_dir: Path, servers: list[Server], workers: int,
                  timeout: float = 30) -> Server:
    """A server script that forks `workers` children and then prints READY (floor_server.py,
    peer_asyncio.py); `cmd` gets the port and the worker count appended."""
    port = free_port()
    cmd = [*cmd, str(port), str(workers)]
    log = run_dir / f"{name}.log"
    server = Server(name, port, start_process(cmd, log), log, cmd)
    servers.append(server)

    def ready() -> bool:
        if "READY" not in tail(log, 5):
            return False
        server.pid = server.proc.pid
        server.extra = psutil.Process(server.pid).children()
        return len(server.extra) == workers

    wait_until(server, ready, timeout)
    return server


def stop_process(proc: subprocess.Popen | psutil.Process, name: str, grace: float) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; always reaped."""
    try:
        if isinstance(proc, subprocess.Popen):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    say(f"# {name} (PID {proc.pid}) still running after SIGTERM + {grace:.0f} s: SIGKILL")
                    proc.kill()
                    proc.wait()
        elif proc.is_running():  # psutil checks the PID was not reused
            proc.terminate()
            try:
                proc.wait(grace)
            except psutil.TimeoutExpired:
                say(f"# {name} (PID {proc.pid}) still running after SIGTERM + {grace:.0f} s: SIGKILL")
                proc.kill()
                proc.wait(grace)
    except (psutil.NoSuchProcess, ProcessLookupError, ChildProcessError):
        pass


def stop_servers(servers: list[Server], grace: float = 10) -> None:
    """Stop (TERM, then KILL) every server started, then reap whatever is left below us."""
    for server in servers:
        stop_process(server.proc, server.name, grace)
    reap_leftovers([], 5)


def reap_leftovers(known: list[psutil.Process], grace: float) -> None:
    """Anything we or our servers started that is still alive: stop it and reap it."""
    leftovers = {p.pid: p for p in known}
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process().children(recursive=True):
            leftovers.setdefault(p.pid, p)
    for p in leftovers.values():
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                say(f"# leftover process {p.pid} ({' '.join(p.cmdline()).strip()}): stopping it")
            stop_process(p, f"leftover {p.pid}", grace)
    # Zombies reparented to us (we are a subreaper) are reaped here.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break


# --- measuring ----------------------------------------------------------------


def uss(pid: int) -> int:
    return psutil.Process(pid).memory_full_info().uss


def run_loadgen(loadgen: Path, port: int, load: Load, args: argparse.Namespace, label: str,
                commands: list[str], procs: list[subprocess.Popen], cpu: str = "",
                midway: Callable[[], dict] | None = None) -> dict:
    """One loadgen run and its figures; `cpu`: pin it to those CPUs (taskset -c); `midway`: called
    halfway through the measured part, its figures added to the run's."""
    cmd = ["taskset", "-c", cpu] if cpu else []
    cmd += [str(loadgen), "-H", HOST, "-p", str(port), "-c", str(load.conns), "-d", str(args.duration),
           "-w", str(args.warmup)]
    if load.cpr:
        cmd.append("-r")
    cmd += ["-l", label]
    line = shlex.join(cmd)
    commands.append(line)
    say("$ " + line)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    procs.append(proc)
    seen = {}
    if midway is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):  # the wait is the way to halfway
            proc.wait(args.warmup + args.duration / 2)
        if proc.poll() is None:
            seen = midway()
    try:
        out, err = proc.communicate(timeout=args.duration + args.warmup + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"failed": "loadgen timed out", "errors": -1, "rps": 0.0}
    result: dict = dict(seen)
    for token in out.split():
        key, sep, value = token.partition("=")
        if not sep:
            continue
        try:
            result[key] = int(value)
        except ValueError:
            try:
                result[key] = float(value)
            except ValueError:
                result[key] = value
    if proc.returncode != 0 or "rps" not in result:
        return {"failed": f"loadgen exit status {proc.returncode}: {(err or out).strip()[:500]}",
                "errors": -1, "rps": 0.0}
    say(f"  rps={result['rps']:.0f} errors={result['errors']} p50_us={result.get('p50_us')} "
        f"p99_us={result.get('p99_us')} starved={result.get('starved')}"
        + (f" first_error={result.get('first_error')}" if result["errors"] else "")
        + (f" split={result['split']}" if "split" in result else ""))
    return result


def tree(server: Server) -> list[psutil.Process]:
    root = psutil.Process(server.pid)
    return [root, *root.children(recursive=True)]


def split(server: Server) -> dict:
    """How the server's established connections sit over its processes, most first ("34/16"):
    the kernel and each server's accept loop decide it, and on this machine it moves the rate."""
    counts = []
    for proc in tree(server):
        try:
            listing = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
            held = sum(1 for c in listing(kind="tcp")
                       if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == server.port)
        except psutil.Error:
            continue
        if held:
            counts.append(held)
    return {"split": "/".join(map(str, sorted(counts, reverse=True))) or "0"}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def measure_workers(lancelotd: Server, limit: int) -> tuple[list[dict], dict, bool]:
    workers = []
    ok = True
    for p in sorted(psutil.Process(lancelotd.pid).children(), key=lambda p: p.pid):
        value = uss(p.pid)
        passed = value <= limit
        ok = ok and passed
        title = " ".join(p.cmdline()).strip()
        workers.append({"pid": p.pid, "title": title, "uss_bytes": value, "pass": passed})
    master = {"pid": lancelotd.pid, "uss_bytes": uss(lancelotd.pid)}
    return workers, master, ok and len(workers) == WORKERS


# --- figures ------------------------------------------------------------------


def ratios_of(a: list[dict], b: list[dict]) -> list[float]:
    """Per-round answers/s of a over b."""
    return [x["rps"] / y["rps"] if y["rps"] > 0 else 0.0 for x, y in zip(a, b, strict=True)]


def summarize(load: Load, runs: dict[str, list[dict]], control: str, args: argparse.Namespace) -> dict:
    """One load's medians, ratios, verdicts and failures (control: the control's name, or '')."""
    a, b = runs["lancelotd"], runs["ref_epoll"]
    ratios = ratios_of(a, b)
    ratio = median(ratios)
    errors = {name: sum(r["errors"] for r in rs if r["errors"] > 0) for name, rs in runs.items()}
    broken = [r["failed"] for rs in runs.values() for r in rs if "failed" in r]
    summary = {
        "load": load.name, "conns": load.conns, "connect_per_request": load.cpr,
        "lancelotd_rps_median": median([r["rps"] for r in a]),
        "lancelotd_p50_us_median": median([r.get("p50_us", 0) for r in a]),
        "lancelotd_p99_us_median": median([r.get("p99_us", 0) for r in a]),
        "lancelotd_errors": errors["lancelotd"],
        "lancelotd_starved": sum(r.get("starved", 0) for r in a),
        "ref_rps_median": median([r["rps"] for r in b]),
        "ref_p99_us_median": median([r.get("p99_us", 0) for r in b]),
        "ref_errors": errors["ref_epoll"],
        "ratios": ratios, "ratio_median": ratio,
        "pass": ratio >= args.floor and not any(errors.values()) and not broken,
        "runs": runs,
    }
    summary["p99_ratio"] = summary["lancelotd_p99_us_median"] / max(summary["ref_p99_us_median"], 1)
    summary["target_met"] = ratio >= args.target and summary["p99_ratio"] <= args.p99_target
    if control:
        c = runs[control]
        summary["control"] = {
            "name": control,
            "rps_median": median([r["rps"] for r in c]),
            "p99_us_median": median([r.get("p99_us", 0) for r in c]),
            "errors": errors[control],
            "vs_ref": median(ratios_of(c, b)),  # what the shape costs C
            "lancelotd_vs_control": median(ratios_of(a, c)),  # what Python costs in that shape
        }
        c = summary["control"]
        c["p99_vs_ref"] = c["p99_us_median"] / max(summary["ref_p99_us_median"], 1)
    failures = [f"ratio {ratio:.3f} < {args.floor}"] if ratio < args.floor else []
    if any(errors.values()):
        failures.append("errors (" + ", ".join(f"{name} {n}" for name, n in errors.items()) + ")")
    summary["failures"] = failures + broken
    return summary


def say_load(s: dict, args: argparse.Namespace) -> None:
    say(f"  -> lancelotd median rps {s['lancelotd_rps_median']:.0f}, "
        f"p50 {s['lancelotd_p50_us_median']:.0f} us, p99 {s['lancelotd_p99_us_median']:.0f} us, "
        f"errors {s['lancelotd_errors']}; ref_epoll median rps "
        f"{s['ref_rps_median']:.0f}, p99 {s['ref_p99_us_median']:.0f} us (x{s['p99_ratio']:.2f}); "
        f"ratios {', '.join(f'{r:.3f}' for r in s['ratios'])}; median ratio {s['ratio_median']:.3f} "
        f"(floor {args.floor}) {'PASS' if s['pass'] else 'FAIL'}")
    if "control" in s:
        c = s["control"]
        say(f"  -> control {c['name']}: median rps {c['rps_median']:.0f}, p99 {c['p99_us_median']:.0f} us; "
            f"{c['vs_ref']:.3f} of ref_epoll's rate with a p99 x{c['p99_vs_ref']:.2f}; "
            f"lancelotd / {c['name']} {c['lancelotd_vs_control']:.3f}")


def say_summary(loads: list[dict], args: argparse.Namespace) -> None:
    control = "control" in loads[0] if loads else False
    say(f"  {'load':<24} {'lancelotd rps':>13} {'p50_us':>7} {'p99_us':>7} {'errors':>6} "
        f"{'ref rps':>9} {'ref p99':>7} {'ratio':>6} {'p99 x':>6}  verdict")
    for s in loads:
        target = "met" if s["target_met"] else "not met"
        say(f"  {s['load']:<24} {s['lancelotd_rps_median']:>13.0f} "
            f"{s['lancelotd_p50_us_median']:>7.0f} {s['lancelotd_p99_us_median']:>7.0f} "
            f"{s['lancelotd_errors']:>6} {s['ref_rps_median']:>9.0f} {s['ref_p99_us_median']:>7.0f} "
            f"{s['ratio_median']:>6.3f} {s['p99_ratio']:>6.2f}  {'PASS' if s['pass'] else 'FAIL'} "
            f"(floor {args.floor}); target {args.target} and p99 x{args.p99_target:g}: {target}")
    if control:
        name = loads[0]["control"]["name"]
        say(f"\n  the control, {name} (C in lancelotd's shape), against ref_epoll and lancelotd:")
        say(f"  {'load':<24} {name + ' rps':>15} {'p99_us':>7} {'/ ref':>6} {'p99 x':>6} "
            f"{'lancelotd / it':>15}")
        for s in loads:
            c = s["control"]
            say(f"  {s['load']:<24} {c['rps_median']:>15.0f} {c['p99_us_median']:>7.0f} {c['vs_ref']:>6.3f} "
                f"{c['p99_vs_ref']:>6.2f} {c['lancelotd_vs_control']:>15.3f}")


# --- main ---------------------------------------------------------------------


def add_load_arguments(p: argparse.ArgumentParser, rounds: int) -> None:
    """The arguments of the side-by-side scripts (ab.py, peers.py): which loads, how long, the C tools."""
    p.add_argument("--loads", default="50,2000,50r",
                   help="connection counts, comma-separated; 'r': connect-per-request (default 50,2000,50r)")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--duration", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loadgen-src", type=Path, default=DEFAULT_LOADGEN_SRC)
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/lancelotd-bench"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loadgen-src", type=Path, default=DEFAULT_LOADGEN_SRC,
                   help=f"folder holding loadgen.c and ref_epoll.c (default: {DEFAULT_LOADGEN_SRC})")
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/lancelotd-bench"),
                   help="where the C tools are built and logs/PID file go (default: /tmp/lancelotd-bench)")
    p.add_argument("--lancelotd-cmd", default=shlex.join([sys.executable, "-m", "lancelotd", "serve"]),
                   help="command that serves in the foreground; '-b HOST:PORT -w 2 --pid-file PATH' is "
                   "appended (default: '%(default)s')")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds per load (default 3)")
    p.add_argument("--duration", type=int, default=5, help="measured seconds per run (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up seconds per run (default 1)")
    p.add_argument("--floor", type=float, default=0.75,
                   help="minimum median lancelotd/ref_epoll rps ratio per load (default 0.75)")
    p.add_argument("--target", type=float, default=0.9,
                   help="issue 13's target ratio, reported as met or not (default 0.9)")
    p.add_argument("--p99-target", type=float, default=2.0,
                   help="issue 13's target: lancelotd's p99 at most this times ref_epoll's (default 2)")
    p.add_argument("--uss-limit-mb", type=float, default=5.0,
                   help="maximum USS of an idle worker, in MiB (default 5)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds to let idle workers settle before measuring USS (default 1)")
    p.add_argument("--start-timeout", type=float, default=20.0, help="seconds to wait for readiness")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL at the end")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help=f"do not run the control, ref_epoll with {WORKERS} processes, in the same rounds")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as JSON")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0:
        p.error("--rounds and --duration must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM to the benchmark unwinds through the finally blocks like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    limit = int(args.uss_limit_mb * MIB)
    report: dict = {"host": HOST, "workers": WORKERS, "rounds": args.rounds, "duration_s": args.duration,
                    "warmup_s": args.warmup, "floor": args.floor, "uss_limit_bytes": limit,
                    "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    servers: list[Server] = []
    loadgens: list[subprocess.Popen] = []
    failures: list[str] = []
    subreaper = become_subreaper()
    try:
        soft, hard = raise_nofile()
        say(f"# RLIMIT_NOFILE soft={soft} hard={hard}; {os.cpu_count()} CPUs; "
            f"Python {report['python']}; subreaper={subreaper}")
        if soft < 2000 + 100:
            say(f"# warning: {soft} file descriptors may be too few for 2,000 connections")
        loadgen, ref_bin = build(args.loadgen_src.resolve(), args.build_dir)
        run_dir = args.build_dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)

        lancelotd = start_lancelotd(shlex.split(args.lancelotd_cmd), run_dir, args.start_timeout, servers)
        ref = start_ref(ref_bin, run_dir, args.start_timeout, servers)
        control = start_ref(ref_bin, run_dir, args.start_timeout, servers, WORKERS) if args.control else None
        say(f"# lancelotd master PID {lancelotd.pid} on {HOST}:{lancelotd.port}, workers "
            f"{[p.pid for p in lancelotd.extra]}; ref_epoll PID {ref.pid} on {HOST}:{ref.port}"
            + (f"; the control {control.name} PID {control.pid} on {HOST}:{control.port}" if control else ""))

        # --- idle memory ---
        time.sleep(args.settle)
        workers, master, uss_ok = measure_workers(lancelotd, limit)
        say(f"\n== idle memory (USS, limit {args.uss_limit_mb:g} MiB = {limit} bytes per worker)")
        for w in workers:
            say(f"  worker PID {w['pid']} ({w['title']}): USS {w['uss_bytes'] / MIB:.2f} MiB "
                f"({w['uss_bytes']} bytes)  {'PASS' if w['pass'] else 'FAIL'}")
        say(f"  master PID {master['pid']}: USS {master['uss_bytes'] / MIB:.2f} MiB "
            f"({master['uss_bytes']} bytes)")
        if len(workers) != WORKERS:
            say(f"  FAIL: expected {WORKERS} workers, found {len(workers)}")
        report["idle_memory"] = {"workers": workers, "master": master, "pass": uss_ok}
        if not uss_ok:
            failures.append("idle worker USS")

        # --- loads: A B A B ... (with the control: A B C, C B A, ...) ---
        report["loads"] = []
        commands: list[str] = []
        in_rounds = [lancelotd, ref, *([control] if control else [])]
        for load in LOADS:
            say(f"\n== load: {load.name} ({args.rounds} rounds, {args.duration} s + {args.warmup} s warm-up)")
            runs: dict[str, list[dict]] = {server.name: [] for server in in_rounds}
            for rnd in range(1, args.rounds + 1):
                for server in in_rounds if rnd % 2 else reversed(in_rounds):  # no server always goes first
                    label = f"{server.name}-c{load.conns}{'-cpr' if load.cpr else ''}-round{rnd}"
                    runs[server.name].append(
                        run_loadgen(loadgen, server.port, load, args, label, commands, loadgens))
                dead = [server for server in in_rounds if server.proc.poll() is not None]
                if dead:
                    raise BenchError(f"{dead[0].name} died during the load; see {dead[0].log}")
            summary = summarize(load, runs, control.name if control else "", args)
            report["loads"].append(summary)
            failures.extend(f"{load.name}: {msg}" for msg in summary["failures"])
            say_load(summary, args)
        report["commands"] = {server.name: shlex.join(server.cmd) for server in in_rounds}
        report["commands"]["loadgen"] = commands

        now = sorted(p.pid for p in psutil.Process(lancelotd.pid).children())
        before = sorted(p.pid for p in lancelotd.extra)
        if now != before:
            say(f"\n# note: lancelotd's workers changed during the benchmark: {before} -> {now}")
        report["workers_replaced"] = now != before

        # --- summary ---
        say("\n== summary")
        say_summary(report["loads"], args)
        for w in workers:
            say(f"  idle worker {w['pid']} USS {w['uss_bytes'] / MIB:.2f} MiB  "
                f"{'PASS' if w['pass'] else 'FAIL'} (limit {args.uss_limit_mb:g} MiB)")
        say(f"  master {master['pid']} USS {master['uss_bytes'] / MIB:.2f} MiB")
        say("\n== commands run (servers, then loadgen in the order run)")
        for server in in_rounds:
            say("  " + shlex.join(server.cmd))
        for line in commands:
            say("  " + line)
    except BenchError as e:
        failures.append(str(e))
        say(f"\nERROR: {e}")
    finally:
        for proc in loadgens:
            stop_process(proc, "loadgen", args.grace)
        known = []
        for server in reversed(servers):
            known.extend(server.extra)
            stop_process(server.proc, server.name, args.grace)
            if server.proc.returncode not in (None, 0):
                say(f"# {server.name} exited with status {server.proc.returncode}")
        reap_leftovers(known, args.grace)
        stopped = ", ".join(f"{s.name} (PID {s.proc.pid})" for s in servers) or "nothing"
        say(f"# stopped and reaped: {stopped}")

    report["failures"] = failures
    report["pass"] = not failures
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        say(f"# figures written to {args.json}")
    say(f"\nRESULT: {'PASS' if not failures else 'FAIL'}" + "".join(f"\n  - {f}" for f in failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
