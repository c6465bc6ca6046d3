#!/usr/bin/env python3
"""Lifecycle under load: HUP storms and a USR2 upgrade while loadgen runs; nothing may be dropped.

Starts lancelotd (2 workers) on 127.0.0.1 and runs, with the C load generator:

  (i)   calm: 50 persistent + 50 connect-per-request clients at once (two loadgens);
  (ii)  the same load during a storm of 40 HUPs, 0.2 s apart: errors, throughput relative to
        (i), when the process count is back to workers + 1, and how long each reload takes
        to hand the old generation's connections over (from the log);
  (iii) a USR2 upgrade during 50 persistent clients;
  (iv)  the HUP storm with only persistent clients, then with only connect-per-request ones.

Every run must show errors=0.  Standalone: Python stdlib + psutil, and the helpers of
bench.py beside it (run it as a script: python benchmarks/lifecycle.py).  See README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil
from bench import (
    DEFAULT_LOADGEN_SRC,
    HOST,
    WORKERS,
    BenchError,
    Server,
    become_subreaper,
    build,
    raise_nofile,
    reap_leftovers,
    say,
    start_lancelotd,
    stop_process,
)

# "2026-11-26 03:59:44,250 INFO [22456] master: reloading ..."
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ \[(\d+)\] ([^:]+): (.*)$", re.M)
SPAWNED = re.compile(r"spawned worker \d+ \(pid (\d+), gen (\d+)\)")
DONE = re.compile(r"reload done: generation (\d+) serving .* generation (\d+) retiring")
HANDED = re.compile(r"handed (\d+) connections over \((\d+) left\)")


@dataclass
class Line:
    t: float  # wall clock, from the log's timestamp (ms)
    pid: int
    role: str
    text: str


@dataclass
class Storm:
    name: str
    hups: list[float] = field(default_factory=list)  # wall-clock times the HUPs were sent
    settle_s: float | None = None  # last HUP -> process count back to workers + 1
    handoffs: list[dict] = field(default_factory=list)


# --- the log ------------------------------------------------------------------------


def read_log(path: Path, start: int) -> tuple[str, list[Line]]:
    """The log from byte offset `start`: its text and its parsed lines."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    lines = []
    for m in LINE.finditer(text):
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        lines.append(Line(t, int(m.group(2)), m.group(3), m.group(4)))
    return text, lines


def hups_handled(lines: list[Line], master: int) -> int:
    """HUPs the master has acted on: each one logs "reloading" or, while a reload is under
    way, "queued"; a queued reload, run once the one under way is done, logs one more
    "reloading" that answers no new HUP."""
    count, queued, queued_run_next = 0, False, False
    for line in lines:
        if line.pid != master:
            continue
        if line.text.startswith("reload requested while one is under way"):
            count += 1
            queued = True
        elif line.text.startswith("reloading "):
            if queued_run_next:
                queued_run_next = False
            else:
                count += 1
        elif line.text.startswith(("reload done", "reload failed", "reload refused")):
            queued_run_next, queued = queued, False
    return count


def reloads_under_way(lines: list[Line], master: int) -> bool:
    mine = [line.text for line in lines if line.pid == master]
    started = sum(t.startswith("reloading ") for t in mine)
    ended = sum(t.startswith(("reload done", "reload failed", "reload refused")) for t in mine)
    return started != ended


def handoffs(lines: list[Line], master: int, hups: list[float]) -> list[dict]:
    """For each reload since the first of `hups`: when it started ("reloading"), the HUP it
    answered, and when the last connection of the generation it retired was handed over
    ("... (0 left)").  `lines`: the whole log (workers spawned earlier may be retired now)."""
    generation_of: dict[int, int] = {}
    for line in lines:
        m = SPAWNED.match(line.text) if line.pid == master else None
        if m:
            generation_of[int(m.group(1))] = int(m.group(2))
    started: list[float] = []
    reloads = []
    for line in lines:
        if line.pid != master or line.t < int(hups[0] * 1000) / 1000:  # the log keeps whole ms
            continue
        if line.text.startswith("reloading "):
            started.append(line.t)
        elif (m := DONE.match(line.text)) and started:
            reloads.append((started[-1], int(m.group(2))))
    results = []
    waiting = sorted(hups)
    for t_reload, old in reloads:
        # The HUPs this reload answers: those sent before it started and not answered yet.
        asked = [h for h in waiting if h <= t_reload + 0.001]  # the log keeps whole ms
        waiting = waiting[len(asked):]
        pids = {pid for pid, g in generation_of.items() if g == old}
        last: dict[int, tuple[float, int]] = {}
        for line in lines:
            m = HANDED.match(line.text) if line.pid in pids else None
            if m:
                last[line.pid] = (line.t, int(m.group(2)))
        if not last:
            results.append({"reload_at": t_reload, "old_generation": old, "handed": False})
            continue
        done = max(t for t, _ in last.values())
        results.append({
            "reload_at": t_reload, "old_generation": old, "handed": True,
            "all_handed": all(left == 0 for _, left in last.values()),
            "from_reload_s": done - t_reload,
            "from_hup_s": done - min(asked) if asked else None,
        })
    return results


# --- processes ------------------------------------------------------------------------


def master_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def process_count(master: int) -> int:
    """The master and its children (zombies count: not reaped yet means still there)."""
    try:
        return 1 + len(psutil.Process(master).children())
    except psutil.Error:
        return 0


def start_loadgen(loadgen: Path, port: int, conns: int, seconds: int, per_request: bool, label: str,
                  procs: list[subprocess.Popen], commands: list[str]) -> subprocess.Popen:
    cmd = [str(loadgen), "-H", HOST, "-p", str(port), "-c", str(conns), "-d", str(seconds), "-l", label]
    if per_request:
        cmd.append("-r")
    line = shlex.join(cmd)
    commands.append(line)
    say("$ " + line + " &")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    procs.append(proc)
    return proc


def finish_loadgen(proc: subprocess.Popen, seconds: int) -> dict:
    """Wait for a loadgen; its full result line and its figures."""
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"line": "(timed out)", "errors": -1, "rps": 0.0, "failed": "loadgen timed out"}
    lines = [line for line in out.splitlines() if "errors=" in line]
    if proc.returncode != 0 or not lines:
        return {"line": (err or out).strip()[:500], "errors": -1, "rps": 0.0,
                "failed": f"loadgen exit status {proc.returncode}"}
    result: dict = {"line": lines[-1]}
    for token in lines[-1].split():
        key, sep, value = token.partition("=")
        if sep:
            try:
                result[key] = int(value)
            except ValueError:
                try:
                    result[key] = float(value)
                except ValueError:
                    result[key] = value
    return result


def hup_storm(storm: Storm, pid_file: Path, log: Path, log_start: int, hups: int, interval: float,
              timeout: float) -> None:
    """Send `hups` HUPs `interval` apart to the master; then time the return to workers + 1."""
    master = master_pid(pid_file)
    if master is None:
        raise BenchError(f"no master PID in {pid_file}")
    say(f"# {hups} x kill -HUP {master}, {interval} s apart")
    for i in range(hups):
        storm.hups.append(time.time())  # before the kill: the master may log its reload at once
        os.kill(master, signal.SIGHUP)
        if i < hups - 1:
            time.sleep(interval)  # the load pattern
    last = time.monotonic()
    deadline = last + timeout
    while time.monotonic() < deadline:
        _, lines = read_log(log, log_start)
        if (hups_handled(lines, master) >= hups and not reloads_under_way(lines, master)
                and process_count(master) == WORKERS + 1):
            storm.settle_s = time.monotonic() - last
            break
        time.sleep(0.01)
    _, lines = read_log(log, 0)
    storm.handoffs = handoffs(lines, master, storm.hups)


def describe_storm(storm: Storm, failures: list[str], settle_limit: float, persistent_only: bool) -> None:
    """Print a storm's figures; a failure when it took too long to settle, when a reload left
    connections behind (drained instead of handed over), or - with persistent clients only,
    so that every generation holds some - when a reload handed nothing over."""
    if storm.settle_s is None:
        say(f"  process count: NOT back to {WORKERS + 1} (master + {WORKERS} workers) in time")
        failures.append(f"{storm.name}: process count not back to {WORKERS + 1}")
    else:
        verdict = "ok" if storm.settle_s <= settle_limit else "FAIL"
        say(f"  process count back to {WORKERS + 1} (master + {WORKERS} workers) "
            f"{storm.settle_s:.2f} s after the last HUP ({verdict}: limit {settle_limit:g} s)")
        if storm.settle_s > settle_limit:
            failures.append(f"{storm.name}: process count back to {WORKERS + 1} only after "
                            f"{storm.settle_s:.2f} s (limit {settle_limit:g} s)")
    moved = [h for h in storm.handoffs if h["handed"]]
    partial = [h for h in moved if not h["all_handed"]]
    idle = len(storm.handoffs) - len(moved)
    say(f"  reloads: {len(storm.handoffs)} for {len(storm.hups)} HUPs; {len(moved)} retired a generation "
        f"holding connections, {idle} one holding none"
        + (f"; {len(partial)} left connections behind (fallback: drained)" if partial else ""))
    if partial:
        failures.append(f"{storm.name}: {len(partial)} reloads left connections behind")
    if persistent_only and idle:
        failures.append(f"{storm.name}: {idle} reloads handed no connection over under persistent clients")
    if moved:
        from_reload = [h["from_reload_s"] * 1000 for h in moved]
        from_hup = [h["from_hup_s"] * 1000 for h in moved if h["from_hup_s"] is not None]
        say(f"  'reloading' -> last connection handed over: median {statistics.median(from_reload):.0f} ms, "
            f"max {max(from_reload):.0f} ms")
        if from_hup:
            say(f"  HUP sent -> last connection handed over: median {statistics.median(from_hup):.0f} ms, "
                f"max {max(from_hup):.0f} ms (a HUP sent during a reload waits for it: queued)")


def check(result: dict, what: str, failures: list[str]) -> None:
    if "failed" in result:
        failures.append(f"{what}: {result['failed']}")
    elif result.get("errors") != 0:
        failures.append(f"{what}: errors={result.get('errors')}")
    elif not result.get("requests"):
        failures.append(f"{what}: no requests answered")


# --- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loadgen-src", type=Path, default=DEFAULT_LOADGEN_SRC,
                   help=f"folder holding loadgen.c (default: {DEFAULT_LOADGEN_SRC})")
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/lancelotd-bench"),
                   help="where loadgen is built; the run's PID file and log go to BUILD_DIR/lifecycle "
                   "(default: /tmp/lancelotd-bench)")
    p.add_argument("--lancelotd-cmd", default=shlex.join([sys.executable, "-m", "lancelotd", "serve"]),
                   help="command that serves in the foreground; '-b HOST:PORT -w 2 --pid-file PATH' is "
                   "appended (default: '%(default)s')")
    p.add_argument("--duration", type=int, default=8, help="seconds per loadgen run (default 8)")
    p.add_argument("--hups", type=int, default=40, help="HUPs per storm (default 40)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between HUPs (default 0.2)")
    p.add_argument("--settle-limit", type=float, default=2.0,
                   help="seconds after the last HUP within which the process count must be back to "
                   "workers + 1 (default 2)")
    p.add_argument("--settle-timeout", type=float, default=30.0,
                   help="seconds after the last HUP to wait for the process count (default 30)")
    p.add_argument("--start-timeout", type=float, default=20.0, help="seconds to wait for readiness")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL at the end")
    args = p.parse_args(argv)
    if args.duration < 1 or args.hups < 1 or args.interval <= 0:
        p.error("--duration and --hups must be at least 1, --interval positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers: list[Server] = []
    loadgens: list[subprocess.Popen] = []
    commands: list[str] = []
    failures: list[str] = []
    successors: list[psutil.Process] = []  # USR2's new master (the first one is servers[0].proc)
    subreaper = become_subreaper()  # USR2's new master is orphaned at birth: we adopt and reap it
    seconds = args.duration
    try:
        soft, hard = raise_nofile()
        say(f"# RLIMIT_NOFILE soft={soft} hard={hard}; {os.cpu_count()} CPUs; "
            f"Python {sys.version.split()[0]}; subreaper={subreaper}")
        if not subreaper:
            say("# warning: not a child subreaper: USR2's new master is init's to reap")
        loadgen, _ = build(args.loadgen_src.resolve(), args.build_dir)
        run_dir = args.build_dir / "lifecycle"
        run_dir.mkdir(parents=True, exist_ok=True)
        server = start_lancelotd(shlex.split(args.lancelotd_cmd), run_dir, args.start_timeout, servers)
        pid_file, log = run_dir / "lancelotd.pid", server.log
        say(f"# lancelotd master PID {server.pid} on {HOST}:{server.port}, workers "
            f"{[p.pid for p in server.extra]}; log {log}")

        def mixed(label: str) -> tuple[subprocess.Popen, subprocess.Popen]:
            return (start_loadgen(loadgen, server.port, 50, seconds, False, f"{label}-persistent", loadgens,
                                  commands),
                    start_loadgen(loadgen, server.port, 50, seconds, True, f"{label}-per-request", loadgens,
                                  commands))

        # (i) calm
        say(f"\n== (i) calm: 50 persistent + 50 connect-per-request clients, {seconds} s")
        a, b = mixed("calm")
        calm = finish_loadgen(a, seconds), finish_loadgen(b, seconds)
        for result, what in zip(calm, ("calm persistent", "calm per-request"), strict=True):
            say(f"  {result['line']}")
            check(result, what, failures)

        # (ii) the same load during a HUP storm
        say(f"\n== (ii) the same load during {args.hups} HUPs, {args.interval} s apart")
        start = log.stat().st_size
        a, b = mixed("hup-storm")
        storm = Storm("(ii) mixed")
        hup_storm(storm, pid_file, log, start, args.hups, args.interval, args.settle_timeout)
        stormy = finish_loadgen(a, seconds), finish_loadgen(b, seconds)
        for result, base, what in zip(stormy, calm, ("storm persistent", "storm per-request"), strict=True):
            say(f"  {result['line']}")
            check(result, what, failures)
            if base.get("rps"):
                say(f"    errors={result.get('errors')}; throughput {result.get('rps', 0) / base['rps']:.0%} "
                    f"of the calm run ({result.get('rps', 0):.0f} vs {base['rps']:.0f} answers/s)")
        describe_storm(storm, failures, args.settle_limit, persistent_only=False)

        # (iii) USR2 during 50 persistent clients
        say(f"\n== (iii) USR2 upgrade during 50 persistent clients, {seconds} s")
        old = master_pid(pid_file)
        if old is None:
            raise BenchError(f"no master PID in {pid_file}")
        start = log.stat().st_size
        a = start_loadgen(loadgen, server.port, 50, seconds, False, "usr2-persistent", loadgens, commands)
        time.sleep(1.0)  # the load pattern: the upgrade happens 1 s into the run
        say(f"# kill -USR2 {old}")
        sent = time.monotonic()
        os.kill(old, signal.SIGUSR2)
        new = None
        while time.monotonic() - sent < args.start_timeout:
            pid = master_pid(pid_file)
            if pid and pid != old and psutil.pid_exists(pid):
                new = pid
                break
            time.sleep(0.01)
        if new is None:
            failures.append("(iii): no new master in the PID file")
            say("  no new master in the PID file")
        else:
            successors.append(psutil.Process(new))
            say(f"  new master {new} in the PID file {time.monotonic() - sent:.2f} s after USR2")
            try:
                server.proc.wait(args.settle_timeout)
                say(f"  old master {old} exited with status {server.proc.returncode} "
                    f"{time.monotonic() - sent:.2f} s after USR2")
            except subprocess.TimeoutExpired:
                failures.append("(iii): the old master did not exit")
                say("  the old master did not exit")
        result = finish_loadgen(a, seconds)
        say(f"  {result['line']}")
        say(f"    errors={result.get('errors')}")
        check(result, "USR2 persistent", failures)
        _, lines = read_log(log, start)
        handed, left = [], {}  # connections per batch; connections left per worker after its last
        for line in lines:
            if m := HANDED.match(line.text):
                handed.append(int(m.group(1)))
                left[line.pid] = int(m.group(2))
        say(f"  the old master's workers handed {sum(handed)} connections over to the new master's "
            f"in {len(handed)} batches; left behind: {sum(left.values())}")
        if not handed or any(left.values()):
            failures.append("(iii): the old master's workers did not hand every connection over")

        # (iv) the storm with one kind of client at a time
        for per_request in (False, True):
            kind = "connect-per-request" if per_request else "persistent"
            say(f"\n== (iv) {args.hups} HUPs, {args.interval} s apart, during 50 {kind} clients, {seconds} s")
            start = log.stat().st_size
            a = start_loadgen(loadgen, server.port, 50, seconds, per_request, f"hup-storm-{kind}", loadgens,
                              commands)
            storm = Storm(f"(iv) {kind}")
            hup_storm(storm, pid_file, log, start, args.hups, args.interval, args.settle_timeout)
            result = finish_loadgen(a, seconds)
            say(f"  {result['line']}")
            say(f"    errors={result.get('errors')}")
            check(result, f"storm {kind}", failures)
            describe_storm(storm, failures, args.settle_limit, persistent_only=not per_request)

        say("\n== commands run (server, then loadgen in the order started)")
        say("  " + shlex.join(server.cmd))
        for line in commands:
            say("  " + line)
    except BenchError as e:
        failures.append(str(e))
        say(f"\nERROR: {e}")
    finally:
        for proc in loadgens:
            stop_process(proc, "loadgen", args.grace)
        known: list[psutil.Process] = []
        for server in servers:
            known.extend(server.extra)
        for master in successors:  # it serves now; the first master has gone (or will, on SIGTERM)
            try:
                known.extend(master.children())
            except psutil.Error:
                pass
            stop_process(master, f"lancelotd master {master.pid}", args.grace)
        for server in servers:
            stop_process(server.proc, server.name, args.grace)
            if server.proc.returncode not in (None, 0):
                say(f"# {server.name} (PID {server.proc.pid}) exited with status {server.proc.returncode}")
        reap_leftovers(known, args.grace)
        stopped = ", ".join([f"master {s.proc.pid}" for s in servers]
                            + [f"master {m.pid}" for m in successors])
        say(f"# stopped and reaped: {stopped or 'nothing'}, their workers, {len(loadgens)} loadgen runs")

    say(f"\nRESULT: {'PASS' if not failures else 'FAIL'}" + "".join(f"\n  - {f}" for f in failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
