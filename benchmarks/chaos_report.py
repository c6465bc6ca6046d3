"""chaos.py's verdict: counts from the log, failures attributed to the SIGKILLs, memory, commands."""

from __future__ import annotations

import errno
import json
import os
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bench import MIB, say
from lifecycle import read_log

KINDS = ("wrong", "reset", "refused", "timeout", "other")
# The probe takes t_connect in user space once connect() has returned: under load that is
# milliseconds after the kernel (and the victim's accept) had the connection.  A connection in
# the victim's hand at the kill, failed after it, with a t_connect up to this much past the kill
# is that connection (its 4-tuple names it; run 2 at b1beb6d: 1.3 ms late at a load of 7).
CONNECT_SLACK_NS = 250_000_000
CONTEXT_S = 3.0  # operations this long before an unattributed failure are listed with it
SHOWN = 40  # unattributed failures listed one by one


@dataclass
class Report:
    args: Any
    chaos: Any
    load_before: tuple = ()
    load_after: tuple = ()
    start_processes: list = field(default_factory=list)
    end_processes: list = field(default_factory=list)
    t0_ns: int = 0
    t0_wall: float = 0.0
    final_colour: int = 0
    settled_s: float | None = None
    converge_from_ns: int = 0
    loads: list = field(default_factory=list)  # 1-min load average, sampled during the run

    def wall(self, t_ns: int) -> str:
        """A monotonic_ns time as the log writes it (local time, ms)."""
        when = datetime.fromtimestamp(self.t0_wall + (t_ns - self.t0_ns) / 1e9)
        return when.strftime("%H:%M:%S.") + f"{when.microsecond // 1000:03d}"

    def rel(self, t_ns: int) -> str:
        return f"+{(t_ns - self.t0_ns) / 1e9:.1f}s"


def pattern(text: str) -> str:
    """A log message with its numbers blanked, to count messages of one kind together."""
    return re.sub(r"\d+(\.\d+)?", "N", text)[:110]


def log_counts(rep: Report) -> tuple[Counter, Counter, list[str]]:
    """Lifecycle events from the log; warnings and errors by kind; traceback excerpts."""
    text, lines = read_log(rep.chaos.log, 0)
    events: Counter = Counter()
    noisy: Counter = Counter()
    for line in lines:
        t = line.text
        for key, prefix in (("reloads started", "reloading "), ("reloads done", "reload done"),
                            ("reloads failed", "reload failed"), ("reloads refused", "reload refused"),
                            ("HUPs queued", "reload requested while one is under way"),
                            ("TTIN applied", "TTIN: "), ("TTOU applied", "TTOU: "),
                            ("upgrades started", "upgrade: starting a new master"),
                            ("upgrades done (new master ready)", "upgrade: new master"),
                            ("upgrades failed", "upgrade failed"), ("USR2 ignored or refused", "USR2"),
                            ("recycled (max_requests)", "served "),
                            ("workers replaced after a crash", "worker ")):
            if t.startswith(prefix) and (key != "workers replaced after a crash" or "unexpectedly" in t) \
                    and (key != "upgrades done (new master ready)" or "is ready" in t):
                events[key] += 1
        if m := re.match(r"handed (\d+) connections over", t):
            events["connections handed over"] += int(m.group(1))
            events["hand-off batches"] += 1
        if t.startswith("a connection came back"):
            events["connections sent back (target full)"] += 1
    for m in re.finditer(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) \[\d+\] ([^:]+): (.*)$", text, re.M):
        noisy[f"{m.group(1)} {m.group(2)}: {pattern(m.group(3))}"] += 1
    tracebacks: Counter = Counter()  # by the exception line and the frame that raised it
    for m in re.finditer(r"^Traceback.*?\n((?:  .*\n)+)(\S.*)$", text, re.M):
        frames = re.findall(r'File "[^"]*/([^"/]+)", line \d+, in (\w+)', m.group(1))
        where = f"{frames[-1][0]}:{frames[-1][1]}" if frames else "?"
        tracebacks[f"{m.group(2).strip()} (in {where})"] += 1
    return events, noisy, tracebacks


def attribute(rep: Report, failures: list[dict]) -> tuple[list[tuple[dict, dict]], list[dict]]:
    """Split the probes' failures: on a connection a SIGKILLed worker held (made before the kill,
    failed after it), or not.

    "Made before": connect() called before the victim was read (kill["t"] is when SIGSTOP was
    sent; the victim may still accept until it has stopped, and it was read, stopped, within
    stopped_ms).  Not the time the client's loop saw the connect done: a loaded client sees it
    after the worker has accepted it, and a connection 0.1 s old, accepted in the instant before the
    SIGSTOP and reset by the SIGKILL, was counted a bug (issue 18)."""
    held: dict[str, list[dict]] = {}
    for kill in rep.chaos.kills:
        for addr in kill["held"]:
            held.setdefault(addr, []).append(kill)
    attributed, other = [], []
    for f in failures:
        # t_dial: when connect() was called; the victim cannot hold a connection dialled after it
        # was seen stopped (k["t"]).  Without it, the late t_connect gets CONNECT_SLACK_NS.
        dialled = f.get("t_dial")
        made, limit = (dialled, 0) if dialled else (f["t_connect"], CONNECT_SLACK_NS)
        kill = next((k for k in held.get(f["port"], [])
                     if made <= k["t"] + limit and k["t"] <= f["t"]), None)
        if kill is not None and f["state"] != 1:  # 1: CONNECTING, the address is the last connection's
            attributed.append((f, kill))
        else:
            other.append(f)
    return attributed, other


def loadgen_figures(rep: Report, probe_held: Counter) -> tuple[Counter, list[str]]:
    """Totals of every loadgen run, and each segment whose errors the kills in it do not explain."""
    totals: Counter = Counter()
    excess = []
    for seg in rep.chaos.segments:
        if seg["results"] is None:
            continue
        in_seg = [k for k in rep.chaos.kills if seg["started"] <= k["t"] <= (seg["ended"] or k["t"])]
        allowed_p = sum(k["loadgen_persistent"] for k in in_seg)
        allowed_r = sum(len(k["held"]) - k["loadgen_persistent"] - probe_held[id(k)] for k in in_seg)
        for result, kind, allowed in zip(seg["results"], ("persistent", "cpr"), (allowed_p, allowed_r),
                                         strict=True):
            if "failed" in result:
                excess.append(f"segment {seg['index']} {kind}: {result['failed']}")
                continue
            totals[f"{kind} requests"] += result.get("requests", 0)
            totals[f"{kind} errors"] += result.get("errors", 0)
            totals[f"{kind} allowed"] += allowed
            for k in KINDS:
                totals[f"{kind} err_{k}"] += result.get(f"err_{k}", 0)
            others = result.get("errors", 0) - result.get("err_reset", 0)
            over = max(0, result.get("err_reset", 0) - allowed) + others
            if over:
                excess.append(f"segment {seg['index']} {kind} ({rep.wall(seg['started'])} for "
                              f"{seg['seconds']} s): errors={result.get('errors')} (reset "
                              f"{result.get('err_reset')}, others {others}) but the kills in it explain "
                              f"{allowed}; first_error={result.get('first_error')}")
    return totals, excess


def describe_failure(rep: Report, f: dict) -> str:
    name = errno.errorcode.get(f["errno"], str(f["errno"])) if f["errno"] else "-"
    state = {1: "connecting", 2: "reading"}.get(f["state"], str(f["state"]))
    age = (f["t"] - f["t_connect"]) / 1e9 if f["t_connect"] else float("nan")
    before = [f"{rep.rel(t)} {what}" for t, what in rep.chaos.timeline
              if f["t"] - CONTEXT_S * 1e9 <= t <= f["t"]]
    return (f"{rep.wall(f['t'])} ({rep.rel(f['t'])}) {f['kind']} {name} while {state}, client {f['port']}, "
            f"connection {age:.2f} s old, question {f['question']}"
            + ("".join(f"\n        after {b}" for b in before[-4:]) if before else ""))


def probe_figures(rep: Report) -> tuple[dict, list[dict], list, dict]:
    results, failures, colours = {}, [], {}
    for proc, out in rep.chaos.probes:
        data = json.loads(out.read_text()) if out.exists() else {"result": "(no output)", "failures": [],
                                                                   "colours": {}}
        kind = "cpr" if " -r" in " ".join(proc.args) else "persistent"
        results[kind] = data["result"]
        failures += data["failures"]
        for n, (count, first, last) in data["colours"].items():
            c = colours.setdefault(int(n), [0, first, last])
            c[0] += count
            c[1], c[2] = min(c[1], first), max(c[2], last)
    attributed, other = attribute(rep, failures)
    return results, attributed, other, colours


def colour_check(rep: Report, colours: dict) -> list[str]:
    """Every colour seen had been published before; after the calm HUP, only the last one."""
    problems = []
    published = rep.chaos.published
    for n, (_count, first, last) in sorted(colours.items()):
        if n not in published or first < published[n]:
            problems.append(f"colour {n} seen at {rep.wall(first)} before it was published")
        if n != rep.final_colour and last > rep.converge_from_ns:
            problems.append(f"colour {n} still answered at {rep.wall(last)}, after the last reload "
                            f"(colour {rep.final_colour}) had settled")
    return problems


def report(rep: Report) -> list[str]:
    chaos, args = rep.chaos, rep.args
    failures: list[str] = []
    (chaos.run_dir / "kills.json").write_text(json.dumps(chaos.kills))
    (chaos.run_dir / "timeline.txt").write_text(
        "".join(f"{rep.wall(t)} {rep.rel(t)} {what}\n" for t, what in chaos.timeline))
    events, noisy, tracebacks = log_counts(rep)
    results, attributed, other, colours = probe_figures(rep)
    probe_held: Counter = Counter(id(k) for _, k in attributed)
    lg, excess = loadgen_figures(rep, probe_held)

    say("\n== operations")
    say("  sent: " + ", ".join(f"{k.upper() if k != 'kill' else 'SIGKILL'} {v}" for k, v in chaos.ops.items())
        + "; skipped: " + ", ".join(f"{k} {v}" for k, v in chaos.skipped.items())
        + "  (TTOU at 1 worker, TTIN at 6, USR2 while one is under way)")
    say("  from the log: " + ", ".join(f"{k} {v}" for k, v in sorted(events.items())))
    held = [len(k["held"]) for k in chaos.kills]
    if held:
        stopped = [k["stopped_ms"] for k in chaos.kills]
        say(f"  SIGKILLed workers held {sum(held)} client connections (median {statistics.median(held):g}, "
            f"max {max(held)} per kill); each was frozen (SIGSTOP) while read: median "
            f"{statistics.median(stopped):.0f} ms, max {max(stopped):.0f} ms")
        in_flight = [k for k in chaos.kills if k.get("unix_queued")]
        if in_flight:
            say(f"  {len(in_flight)} victims had hand-offs waiting on their Unix sockets at the kill: "
                + "; ".join(f"{k['pid']}: {k['unix_queued']}" for k in in_flight))
    masters = list(chaos.masters)
    say(f"  masters: {len(masters)} ({' -> '.join(map(str, masters))})")

    say(f"\n== loadgen (C): 2 x {args.clients - args.probe_conns} clients, "
        f"{len(chaos.segments)} runs of each kind")
    for kind in ("persistent", "cpr"):
        say(f"  {kind:<10} requests {lg[kind + ' requests']:>9}  errors {lg[kind + ' errors']:>5} ("
            + " ".join(f"{k} {lg[f'{kind} err_{k}']}" for k in KINDS)
            + f");  resets the kills explain: up to {lg[kind + ' allowed']}")
    for line in excess:
        say(f"  NOT EXPLAINED: {line}")
    if excess:
        failures.append(f"loadgen: {len(excess)} runs with errors the SIGKILLs do not explain")

    say(f"\n== probe (Python): 2 x {args.probe_conns} clients, every failure attributed per connection")
    for kind, line in results.items():
        say(f"  {kind}: {line}")
    by_kind = Counter(f["kind"] for f, _ in attributed)
    say(f"  failures on connections of SIGKILLed workers (allowed): {len(attributed)} "
        f"({', '.join(f'{k} {v}' for k, v in by_kind.items()) or '-'})")
    say(f"  other failures (bugs): {len(other)} "
        f"({', '.join(f'{k} {v}' for k, v in Counter(f['kind'] for f in other).items()) or '-'})")
    for f in sorted(other, key=lambda f: f["t"])[:SHOWN]:
        say("    " + describe_failure(rep, f))
    if other:
        failures.append(f"probe: {len(other)} failures not on a SIGKILLed worker's connection")

    say(f"\n== the changing answer ({chaos.config.name}: \"What colour is the day?\" = "
        "\"Colour number N.\")")
    seen = sum(c[0] for c in colours.values())
    say(f"  published colours 1..{chaos.colour}; {len(colours)} distinct seen in {seen} answers; "
        f"last reload (colour {rep.final_colour}) settled "
        + (f"{rep.settled_s:.1f} s after its HUP" if rep.settled_s is not None else "NOT within 60 s"))
    for problem in colour_check(rep, colours):
        say(f"  WRONG: {problem}")
        failures.append(problem)
    if rep.settled_s is None:
        failures.append("the last reload did not settle to 1 master + 2 workers within 60 s")

    say("\n== log: warnings and errors by kind")
    for what, count in noisy.most_common():
        say(f"  {count:>5}  {what}")
    for what, count in tracebacks.most_common():
        say(f"  {count:>5}  TRACEBACK: {what}")
    if tracebacks:
        failures.append(f"{sum(tracebacks.values())} tracebacks in the log")

    before = " ".join(f"{x:.2f}" for x in rep.load_before)
    after = " ".join(f"{x:.2f}" for x in rep.load_after)
    say(f"\n== machine: {os.cpu_count()} CPUs; load average (1, 5, 15 min) before {before}, after {after}; "
        f"1-min load average sampled each second during the run: min {min(rep.loads, default=0):.2f}, "
        f"median {statistics.median(rep.loads) if rep.loads else 0:.2f}, max {max(rep.loads, default=0):.2f}")
    say("\n== commands (the daemon; the probes; the first loadgen pair: every run repeats it with "
        f"the label chaos-NNN-..., -d {args.segment} or less for the last)")
    for line in chaos.commands:
        say("  " + line)
    return failures


def memory_table(rep: Report) -> str:
    out = ["\n== processes and memory (idle, before the load and after it)"]
    for name, procs in (("start", rep.start_processes), ("end", rep.end_processes)):
        masters = [p for p in procs if p["role"] == "master"]
        workers = [p for p in procs if p["role"] == "worker"]
        out.append(f"  {name}: {len(procs)} processes ({len(masters)} master, {len(workers)} workers)")
        for p in procs:
            out.append(f"    {p['role']:<6} {p['pid']:>7}  RSS {p['rss'] / MIB:6.2f} MiB  USS "
                       f"{p['uss'] / MIB:6.2f} MiB  {p['title']}")
        if workers:
            out.append(f"    workers: RSS {sum(p['rss'] for p in workers) / MIB:.2f} MiB, USS "
                       f"{sum(p['uss'] for p in workers) / MIB:.2f} MiB in all")
    return "\n".join(out)
