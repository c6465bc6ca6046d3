#!/usr/bin/env python3
"""Hostile and heavy clients: does a well-behaved client still get prompt answers?

Each scenario starts lancelotd (2 workers by default) and a load generator
(this script, as a child process) and, while the hostile load runs, a
well-behaved client asks "What is your name?" on 4 persistent connections
in turn, plus one question on a new connection every 10th round.  Printed:
its p50/p99/max latency, and each worker's USS (peak and at the end) next
to the documented bound for the connections it holds (README, "Bounds").

  a  400 clients flooding '?' without ever reading their answers
  b  2,000 slowloris connections (half a question, a byte every 2 s)
  c  10,000 idle connections
  d  a connect flood (connect, close, as fast as one process can)

`--ab REV` instead measures what the bounds cost the normal load: this
checkout against git revision REV (its lancelotd/ exported to a temporary
directory), 2 workers each, alternate loadgen runs of 50 persistent clients
(A B A B ...), as scoreboard_cost.py does.  Uses bench.py beside it (run it
as a script: python benchmarks/hostile.py).  Only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench
import psutil
from bench import HOST, MIB, REPO, BenchError, Load, median, say

QUESTION, ANSWER = b"What is your name?", b"My name is Sir Lancelot of Camelot."
SCENARIOS = {
    "a": ("400 clients flooding '?' without reading", "flood", 400),
    "b": ("2,000 slowloris connections", "slowloris", 2000),
    "c": ("10,000 idle connections", "idle", 10000),
    "d": ("a connect flood", "connect", 0),
}
CONFIG = "[protocol]\nmax_connections = 12000\n"  # 10,000 idle ones on one worker, and the probe
# The documented worst case of one connection (README, "Bounds"): held input
# (RECV_SIZE + max_question_bytes) + one slice of output + the objects.
PER_CONNECTION_BOUND = 16384 + 1024 + 16384 + 2048
WORKING_SET = 4 * MIB  # what a busy worker's own allocations add to its idle USS (README, "Bounds")


# --- the hostile side (a child process) ----------------------------------------


def connect_many(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection((HOST, port), timeout=30)
        s.setblocking(False)
        socks.append(s)
    return socks


def generate(kind: str, port: int, count: int) -> None:
    """Run one hostile load until SIGTERM; print 'ready' once it is in place."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    socks = connect_many(port, count)
    print("ready", flush=True)
    if kind == "flood":  # send '?' as long as the kernel takes it; never read
        ep = select.epoll()
        for s in socks:
            ep.register(s.fileno(), select.EPOLLOUT)
        by_fd = {s.fileno(): s for s in socks}
        payload = b"?" * 65536
        while True:
            for fd, _ in ep.poll(1.0):
                try:
                    by_fd[fd].send(payload)
                except BlockingIOError:
                    pass
                except OSError:
                    ep.unregister(fd)
    elif kind == "slowloris":
        for s in socks:
            s.send(b"What is your")
        while True:
            for s in socks:
                time.sleep(2.0 / len(socks))
                try:
                    s.send(b"x")
                except OSError:
                    pass
    elif kind == "idle":
        while True:
            time.sleep(1)
    elif kind == "connect":
        while True:
            try:
                socket.create_connection((HOST, port), timeout=5).close()
            except OSError:
                time.sleep(0.001)


# --- the well-behaved side ------------------------------------------------------


def ask_on(sock: socket.socket) -> float:
    t0 = time.perf_counter()
    sock.sendall(QUESTION)
    got = b""
    while not got.endswith(b"."):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        got += chunk
    if got != ANSWER:
        raise ConnectionError(f"wrong answer {got!r}")
    return time.perf_counter() - t0


def probe(port: int, duration: float, workers: list[psutil.Process]) -> dict:
    """Ask for `duration` seconds; latencies, errors and the workers' peak USS."""
    conns = [socket.create_connection((HOST, port), timeout=10) for _ in range(4)]
    latencies: list[float] = []
    timeline: dict[int, float] = {}  # second of the run -> its worst latency
    start = time.monotonic()
    fresh: list[float] = []
    errors = 0
    peak = {w.pid: 0 for w in workers}
    next_sample = 0.0
    end = time.monotonic() + duration
    rounds = 0
    try:
        while time.monotonic() < end:
            rounds += 1
            for i, sock in enumerate(conns):
                try:
                    latencies.append(ask_on(sock))
                    second = int(time.monotonic() - start)
                    timeline[second] = max(timeline.get(second, 0.0), latencies[-1])
                except OSError:
                    errors += 1
                    conns[i] = socket.create_connection((HOST, port), timeout=10)
            if rounds % 10 == 0:
                t0 = time.perf_counter()
                try:
                    with socket.create_connection((HOST, port), timeout=10) as s:
                        ask_on(s)
                    fresh.append(time.perf_counter() - t0)
                except OSError:
                    errors += 1
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + 0.5
                for w in workers:
                    peak[w.pid] = max(peak[w.pid], bench.uss(w.pid))
            time.sleep(0.005)
    finally:
        for sock in conns:
            sock.close()
    return {"latencies": latencies, "fresh": fresh, "errors": errors, "peak_uss": peak, "timeline": timeline}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1] if len(values) > 1 \
        else values[0]


def run_scenario(key: str, args: argparse.Namespace, run_dir: Path) -> bool:
    title, kind, count = SCENARIOS[key]
    say(f"\n== ({key}) {title}, {args.workers} worker(s), {args.duration:g} s")
    servers: list[bench.Server] = []
    generator = None
    try:
        bench.WORKERS = args.workers  # start_lancelotd starts and waits for that many
        config = run_dir / "hostile.toml"
        config.write_text(CONFIG)
        os.chdir(args.lancelotd_from)  # `python -m` imports from the working directory first
        server = bench.start_lancelotd([sys.executable, "-m", "lancelotd", "serve", "-c", str(config)],
                                       run_dir, 20, servers)
        workers = server.extra
        time.sleep(1)
        idle = {w.pid: bench.uss(w.pid) for w in workers}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--generate", kind,
               "--port", str(server.port), "--count", str(count)]
        say("$ " + " ".join(cmd))
        generator = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        if generator.stdout.readline().strip() != "ready":
            raise BenchError(f"the load generator failed (status {generator.wait()})")
        result = probe(server.port, args.duration, workers)
        lat, fresh = result["latencies"], result["fresh"]
        p99 = pct(lat, 99)
        say(f"  well-behaved, persistent: {len(lat)} answers, p50 {pct(lat, 50) * 1e3:.2f} ms, "
            f"p99 {p99 * 1e3:.2f} ms, max {max(lat) * 1e3:.1f} ms")
        say("  worst latency each second (ms): " + " ".join(
            f"{result['timeline'].get(i, float('nan')) * 1e3:.0f}" for i in range(int(args.duration))))
        say(f"  well-behaved, new connection each: {len(fresh)} answers, p50 {pct(fresh, 50) * 1e3:.2f} ms, "
            f"p99 {pct(fresh, 99) * 1e3:.2f} ms, max {max(fresh, default=0) * 1e3:.1f} ms; "
            f"errors {result['errors']}")
        ok = p99 < 0.100 and pct(fresh, 99) < 0.100 and not result["errors"]
        for w in workers:
            conns = max(w.num_fds() - 8, 0)  # about: the worker's own descriptors are ~8
            bound = idle[w.pid] + WORKING_SET + conns * PER_CONNECTION_BOUND
            end_uss = bench.uss(w.pid)
            within = max(result["peak_uss"][w.pid], end_uss) <= bound
            ok = ok and within
            say(f"  worker {w.pid}: ~{conns} connections; USS idle {idle[w.pid] / MIB:.2f} MiB, "
                f"peak {result['peak_uss'][w.pid] / MIB:.2f} MiB, end {end_uss / MIB:.2f} MiB "
                f"({(end_uss - idle[w.pid]) / max(conns, 1):.0f} B a connection); bound "
                f"{bound / MIB:.1f} MiB {'within' if within else 'EXCEEDED'}")
        say(f"  -> {'PASS' if ok else 'FAIL'} (p99 < 100 ms, no errors, USS within the bound)")
        return ok
    finally:
        if generator is not None:
            bench.stop_process(generator, "generator", 5)
        for server in servers:
            bench.stop_process(server.proc, "lancelotd", 10)
        bench.reap_leftovers([], 5)


def worker_cpu(server: bench.Server) -> float:
    """CPU seconds (user + system) the server's workers have used."""
    return sum(sum(w.cpu_times()[:2]) for w in server.extra)


def answered(server: bench.Server, source: Path) -> int:
    """Questions the server has answered, from its scoreboard (published once a tick).

    `status` comes from the server's own source: another revision may have another scoreboard layout.
    """
    time.sleep(1.2)
    pid_file = Path(server.cmd[server.cmd.index("--pid-file") + 1])
    out = subprocess.run([sys.executable, "-m", "lancelotd", "status", "--json", "--pid-file", str(pid_file)],
                         capture_output=True, text=True, cwd=source).stdout
    return json.loads(out)["totals"]["answered"]


def run_ab(args: argparse.Namespace) -> int:
    """This checkout (A) against revision REV (B) under 50 persistent clients, alternating."""
    loadgen, _ = bench.build(args.loadgen_src, args.build_dir)
    load = Load("50 persistent", 50, False)
    rps: dict[str, list[float]] = {"this checkout": [], args.ab: []}
    cpu: dict[str, list[float]] = {"this checkout": [], args.ab: []}  # worker CPU us per answer
    servers: list[bench.Server] = []
    commands: list[str] = []
    procs: list[subprocess.Popen] = []
    bench.WORKERS = 2
    with tempfile.TemporaryDirectory(prefix="lancelotd-ab-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.ab, "lancelotd"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        sources = {"this checkout": REPO, args.ab: Path(tmp)}
        try:
            running = {}
            for name, source in sources.items():
                run_dir = args.build_dir / f"ab-{len(running)}"
                run_dir.mkdir(parents=True, exist_ok=True)
                os.chdir(source)  # `python -m` imports from the working directory first
                serve = [sys.executable, "-m", "lancelotd", "serve"]
                running[name] = bench.start_lancelotd(serve, run_dir, 30, servers)
                say(f"# {name}: lancelotd from {source / 'lancelotd'}")
            os.chdir(REPO)
            for round_ in range(1, args.rounds + 1):
                for name, server in running.items():
                    label = f"ab-{round_}"
                    before = (worker_cpu(server), answered(server, sources[name]))
                    result = bench.run_loadgen(loadgen, server.port, load, args, label, commands, procs)
                    if result.get("errors"):
                        raise BenchError(f"{name}: errors in round {round_}: {result}")
                    rps[name].append(result["rps"])
                    done = answered(server, sources[name]) - before[1]
                    cpu[name].append((worker_cpu(server) - before[0]) / done * 1e6)
                    say(f"    {name}: {cpu[name][-1]:.2f} us of worker CPU per answer")
        except BenchError as e:
            say(f"FAIL: {e}")
            return 1
        finally:
            bench.stop_servers(servers)
    a, b = (median(v) for v in rps.values())
    say("")
    for name, values in rps.items():
        runs = ", ".join(f"{v:.0f}" for v in values)
        say(f"  {name:14s} median {median(values):9.0f} answers/s  runs {runs}")
    say(f"  this checkout / {args.ab} = {a / b:.3f} ({(a / b - 1) * 100:+.1f}%)")
    for name, values in cpu.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        say(f"  {name:14s} median {median(values):6.2f} us of worker CPU per answer  runs {runs}")
    a, b = (median(v) for v in cpu.values())
    ratios = [x / y for x, y in zip(*cpu.values(), strict=True)]
    say(f"  CPU per answer, this checkout / {args.ab} = {a / b:.3f} ({(a / b - 1) * 100:+.1f}%); "
        f"per-round ratios {', '.join(f'{r:.3f}' for r in ratios)}, median {median(ratios):.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenarios", nargs="*", help=f"which of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--lancelotd-from", type=Path, default=REPO,
                   help="serve the lancelotd package found in this directory (default: this checkout)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--duration", type=float, default=10.0, help="seconds the well-behaved client asks")
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/lancelotd-bench"))
    p.add_argument("--ab", metavar="REV", help="A/B the normal persistent load against git revision REV")
    p.add_argument("--loadgen-src", type=Path, default=bench.DEFAULT_LOADGEN_SRC)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--generate", choices=["flood", "slowloris", "idle", "connect"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if set(args.scenarios) - set(SCENARIOS):
        p.error(f"unknown scenario: choose from {', '.join(SCENARIOS)}")
    soft, hard = bench.raise_nofile()
    if args.generate:
        generate(args.generate, args.port, args.count)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench.become_subreaper()
    say(f"# RLIMIT_NOFILE soft={soft} hard={hard}; {os.cpu_count()} CPUs")
    if args.ab:
        if args.duration == p.get_default("duration"):
            args.duration = 5
        args.duration = int(args.duration)
        return run_ab(args)
    run_dir = args.build_dir / "hostile"
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for key in args.scenarios or SCENARIOS:
        try:
            results[key] = run_scenario(key, args, run_dir)
        except BenchError as e:
            say(f"  ERROR: {e}")
            results[key] = False
    say("\nRESULT: " + ", ".join(f"({k}) {'PASS' if v else 'FAIL'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
