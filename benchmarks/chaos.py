#!/usr/bin/env python3
"""Chaos under load: random HUP, TTIN, TTOU, USR2, max_requests recycling and SIGKILL of workers.

For --minutes (default 10), one lancelotd (2 workers, its own temporary directory, config, PID
file and log) takes a random sequence (--seed) of lifecycle operations while 50 persistent and 50
connect-per-request clients run: loadgen (C) for most of them, chaos_probe.py (Python) for
--probe-conns of each kind, which records every failure with the connection it hit.  Before each
SIGKILL the victim is stopped (SIGSTOP) and the client addresses it holds are read, so every
failure is either on a connection of a killed worker (allowed) or a bug.  See README.md.

Run as a script, with lancelotd importable: python benchmarks/chaos.py [--minutes 2] [--seed 1].
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from bench import DEFAULT_LOADGEN_SRC, HOST, BenchError, become_subreaper, build, raise_nofile, say
from bench import start_lancelotd as bench_start_lancelotd
from chaos_report import Report, memory_table, report
from lifecycle import finish_loadgen, master_pid

from lancelotd.scoreboard import Scoreboard

HERE = Path(__file__).resolve().parent
COLOUR_QUESTION = "What colour is the day?"
MAX_WORKERS = 6  # TTIN stops here: the machine has 2 cores
OPERATIONS = {"hup": 30, "ttin": 15, "ttou": 15, "kill": 25, "usr2": 6}  # relative weights
CALM = 20.0  # seconds at the end without chaos: a last HUP, then the answers must converge


def write_config(path: Path, colour: int, args: argparse.Namespace, extra: str = "") -> None:
    """The whole config, atomically: a HUP never reads half a file.  `extra`: more TOML (soak.py's)."""
    text = (
        "[lifecycle]\n"
        f"max_requests = {args.max_requests}\n"
        f"max_requests_jitter = {args.max_requests_jitter}\n"
        "\n[answers]\n"
        '"What is your name?" = "My name is Sir Lancelot of Camelot."\n'
        '"What is your quest?" = "To seek the Holy Grail."\n'
        '"What is your favorite color?" = "Blue."\n'
        f'"{COLOUR_QUESTION}" = "Colour number {colour}."\n'
        + extra
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def title(proc: psutil.Process) -> str:
    """The process title, without setproctitle's padding."""
    return " ".join(" ".join(proc.cmdline()).split())


def is_worker(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE and "worker" in title(proc)
    except psutil.Error:
        return False


def snapshot(proc: psutil.Process) -> dict:
    """A process's RSS, USS and title."""
    try:
        mem = proc.memory_full_info()
        return {"pid": proc.pid, "title": title(proc), "rss": mem.rss, "uss": mem.uss}
    except psutil.Error:
        return {"pid": proc.pid, "title": "(gone)", "rss": 0, "uss": 0}


def socket_inodes(pid: int) -> set[int]:
    """The inodes of a process's sockets (from /proc: fast, unlike psutil's net_connections,
    which parses every TCP socket of the machine: seconds under a connect-per-request load)."""
    found = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{name}")
            if link.startswith("socket:["):
                found.add(int(link[8:-1]))
    return found


def wait_stopped(pid: int, timeout: float = 1.0) -> None:
    """kill(SIGSTOP) returns before the process stops: until it has, it may still accept."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] in "tT":
                    return
        except OSError:
            return
        time.sleep(0.001)


def tcp_by_inode(port: int) -> dict[int, tuple[str, str]]:
    """inode -> (local, peer) of the established TCP sockets from or to `port` (ss filters in the kernel)."""
    cmd = ["ss", "-tnHe", "state", "established", f"( sport = :{port} or dport = :{port} )"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        inode = next((f[4:] for f in fields if f.startswith("ino:")), None)
        if inode and len(fields) >= 4:
            found[int(inode)] = (fields[2], fields[3])
    return found


def unix_backlog(pid: int, inodes: set[int]) -> str:
    """What waits on a process's Unix sockets: channels to its hand-off inbox not accepted yet,
    and messages unread on its channels (connections in flight to it die with it)."""
    out = subprocess.run(["ss", "-xanH"], capture_output=True, text=True, timeout=10).stdout
    backlog = unread = 0
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6 or not fields[2].isdigit() or not fields[5].isdigit():
            continue
        if fields[1] == "LISTEN" and fields[4].endswith(f"-handoff-{pid}"):
            backlog += int(fields[2])
        elif int(fields[5]) in inodes:
            unread += int(fields[2])
    return f"{backlog} channels not accepted, {unread} messages unread" if backlog or unread else ""


class Chaos:
    """The run: the daemon, its masters over time, the clients, the operations and their record."""

    config_extra = ""  # more of the config file (soak.py's idle_timeout)

    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.run_dir = run_dir
        self.config = run_dir / "lancelotd.toml"
        self.pid_file = run_dir / "lancelotd.pid"
        self.servers: list = []  # bench.Server: the first master
        self.masters: dict[int, psutil.Process] = {}  # every master seen, by PID
        self.master_exits: dict[int, float] = {}  # PID -> monotonic time it was seen gone
        self.successors: set[int] = set()  # masters started by USR2: our children (we are a subreaper)
        self.colour = 1
        self.published: dict[int, int] = {}  # colour -> monotonic_ns when written
        self.ops: dict[str, int] = dict.fromkeys(["hup", "ttin", "ttou", "usr2", "kill"], 0)
        self.skipped: dict[str, int] = dict.fromkeys(["ttin", "ttou", "usr2", "kill"], 0)
        self.timeline: list[tuple[int, str]] = []  # (monotonic_ns, what)
        self.kills: list[dict] = []
        self.segments: list[dict] = []  # loadgen pairs: started, ended, procs, results
        self.probes: list[tuple[subprocess.Popen, Path]] = []
        self.commands: list[str] = []
        self.upgrading_from: int | None = None  # master that got our last USR2, until replaced or refused
        self.usr2_log_offset = 0

    # --- the daemon -------------------------------------------------------------------

    def start(self) -> None:
        write_config(self.config, self.colour, self.args, self.config_extra)
        self.published[self.colour] = time.monotonic_ns()
        base = [*shlex.split(self.args.lancelotd_cmd), "-c", str(self.config)]
        server = bench_start_lancelotd(base, self.run_dir, self.args.start_timeout, self.servers)
        self.port, self.log = server.port, server.log
        self.masters[server.pid] = psutil.Process(server.pid)
        self.commands.insert(0, shlex.join(server.cmd))

    def master(self) -> int | None:
        """The master the PID file names now; remembers each new one (a USR2 successor)."""
        pid = master_pid(self.pid_file)
        if pid and pid not in self.masters:
            with contextlib.suppress(psutil.Error):
                self.masters[pid] = psutil.Process(pid)
                if self.masters[pid].ppid() == os.getpid():
                    self.successors.add(pid)
                self.note(f"master {pid} in the PID file")
        return pid

    def live_masters(self) -> list[psutil.Process]:
        self.reap()
        return [p for pid, p in self.masters.items() if pid not in self.master_exits]

    def reap(self) -> None:
        """Reap successors that exited (our children); note every master's exit."""
        for pid in self.successors:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        for pid, proc in self.masters.items():
            if pid not in self.master_exits:
                try:
                    gone = not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
                except psutil.Error:
                    gone = True
                if gone:
                    self.master_exits[pid] = time.monotonic()
                    self.note(f"master {pid} exited")

    def workers(self) -> list[psutil.Process]:
        found = []
        for master in self.live_masters():
            with contextlib.suppress(psutil.Error):
                found += [p for p in master.children() if is_worker(p)]
        return found

    def target(self) -> int | None:
        header = self.header()
        return None if header is None else header.workers_target

    def header(self):
        try:
            board = Scoreboard.open(str(self.pid_file) + ".scoreboard")
        except (OSError, ValueError):
            return None
        try:
            return board.read_header()
        except ValueError:
            return None
        finally:
            board.close()

    def settled(self, workers: int, reloads: int = 0) -> bool:
        """One master, `workers` workers, no reload under way, at least `reloads` reloads done
        (a HUP not yet acted on leaves reload_pending at 0)."""
        master = self.master()
        if master is None or len(self.live_masters()) != 1:
            return False
        header = self.header()
        if header is None or header.master_pid != master:
            return False
        return not header.reload_pending and header.reloads >= reloads and len(self.workers()) == workers

    def processes(self) -> list[dict]:
        out = []
        for master in self.live_masters():
            out.append({**snapshot(master), "role": "master"})
            with contextlib.suppress(psutil.Error):
                out += [{**snapshot(p), "role": "worker"} for p in master.children()]
        return out

    # --- operations -------------------------------------------------------------------

    def note(self, what: str) -> None:
        self.timeline.append((time.monotonic_ns(), what))

    def signal_master(self, sig: signal.Signals, what: str) -> bool:
        pid = self.master()
        if pid is None:
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        self.note(f"{what} -> master {pid}")
        return True

    def hup(self) -> None:
        self.colour += 1
        self.published[self.colour] = time.monotonic_ns()  # before the file: no answer precedes it
        write_config(self.config, self.colour, self.args, self.config_extra)
        self.ops["hup"] += self.signal_master(signal.SIGHUP, f"HUP (colour {self.colour})")

    def ttin(self) -> None:
        target = self.target()
        if target is None or target >= MAX_WORKERS:
            self.skipped["ttin"] += 1
            return
        self.ops["ttin"] += self.signal_master(signal.SIGTTIN, f"TTIN (target was {target})")

    def ttou(self) -> None:
        target = self.target()
        if target is None or target <= 1:
            self.skipped["ttou"] += 1
            return
        self.ops["ttou"] += self.signal_master(signal.SIGTTOU, f"TTOU (target was {target})")

    def usr2(self) -> None:
        if len(self.live_masters()) > 1 or self.upgrading_from is not None:
            self.skipped["usr2"] += 1  # the last upgrade is still under way: it would be refused
            return
        self.usr2_log_offset = self.log.stat().st_size
        if self.signal_master(signal.SIGUSR2, "USR2"):
            self.ops["usr2"] += 1
            self.upgrading_from = self.master()

    def follow_upgrade(self) -> None:
        """The PID file names a new master once the upgrade succeeded; the old master's log
        lines say if it failed or refused (then another USR2 may follow)."""
        old = self.upgrading_from
        if old is None:
            return
        if self.master() != old:
            self.upgrading_from = None
            return
        with contextlib.suppress(OSError), open(self.log, "rb") as f:
            f.seek(self.usr2_log_offset)
            text = f.read().decode("utf-8", "replace")
            if f"[{old}] master: upgrade failed" in text or f"[{old}] master: USR2" in text:
                self.upgrading_from = None

    def kill(self) -> None:
        """SIGKILL a random worker of any live master; first freeze it and read what it holds."""
        workers = self.workers()
        if not workers:
            self.skipped["kill"] += 1
            return
        victim = self.rng.choice(workers)
        persistent = set()  # the persistent loadgen's sockets: its connections are stable
        for seg in self.segments[-1:]:
            persistent = socket_inodes(seg["procs"][0].pid)
        try:
            name = title(victim)
            victim.send_signal(signal.SIGSTOP)  # frozen: it accepts, adopts and closes nothing now
        except psutil.Error:
            self.skipped["kill"] += 1
            return
        t_signal = time.monotonic_ns()
        try:
            wait_stopped(victim.pid)
            # Until it has stopped it still accepts: a connection made in those milliseconds (144 ms
            # under load, once) is among those it holds, so the kill's time for the attribution of
            # failures (chaos_report.attribute: connected before the kill) is when it was stopped.
            t = time.monotonic_ns()
            inodes = socket_inodes(victim.pid)
            tcp = tcp_by_inode(self.port)
            queued = unix_backlog(victim.pid, inodes)
        finally:
            with contextlib.suppress(psutil.Error):
                victim.send_signal(signal.SIGKILL)
        stopped_ms = (t - t_signal) / 1e6
        held = [tcp[i][1] for i in inodes if i in tcp]
        loadgen_local = {tcp[i][0] for i in persistent if i in tcp}
        self.ops["kill"] += 1
        self.kills.append({"t": t, "pid": victim.pid, "title": name, "held": held,
                           "loadgen_persistent": sum(a in loadgen_local for a in held),
                           "stopped_ms": stopped_ms, "unix_queued": queued})
        self.note(f"SIGKILL worker {victim.pid} ({name}) holding {len(held)} connections "
                  f"(stopped {stopped_ms:.0f} ms)"
                  + (f"; its hand-off sockets: {queued}" if queued else ""))

    # --- clients ----------------------------------------------------------------------

    def start_probes(self, seconds: int) -> None:
        for per_request in (False, True):
            kind = "cpr" if per_request else "persistent"
            out = self.run_dir / f"probe-{kind}.json"
            cmd = [sys.executable, str(HERE / "chaos_probe.py"), "-H", HOST, "-p", str(self.port),
                   "-c", str(self.args.probe_conns), "-d", str(seconds), "-T", str(self.args.timeout_ms),
                   "-l", f"probe-{kind}", "--out", str(out)]
            if per_request:
                cmd.append("-r")
            self.commands.append(shlex.join(cmd))
            say("$ " + shlex.join(cmd) + " &")
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            self.probes.append((proc, out))

    def start_segment(self, loadgen: Path, seconds: int) -> None:
        """One loadgen per kind of client, both for `seconds`."""
        index = len(self.segments) + 1
        procs = []
        conns = self.args.clients - self.args.probe_conns
        for per_request in (False, True):
            label = f"chaos-{index:03d}-{'cpr' if per_request else 'persistent'}"
            cmd = [str(loadgen), "-H", HOST, "-p", str(self.port), "-c", str(conns), "-d", str(seconds),
                   "-T", str(self.args.timeout_ms), "-l", label]
            if per_request:
                cmd.append("-r")
            if index == 1:
                self.commands.append(shlex.join(cmd))
                say("$ " + shlex.join(cmd) + " &")
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, start_new_session=True))
        self.segments.append({"index": index, "started": time.monotonic_ns(), "ended": None,
                              "seconds": seconds, "procs": procs, "results": None})

    def segment_done(self) -> bool:
        seg = self.segments[-1]
        if seg["results"] is not None:
            return True
        if any(p.poll() is None for p in seg["procs"]):
            return False
        seg["ended"] = time.monotonic_ns()
        seg["results"] = [finish_loadgen(p, seg["seconds"]) for p in seg["procs"]]
        return True

    def stop_all(self) -> None:
        """Every process we started, whatever state the run is in: clients, then the daemon's group."""
        procs = [p for seg in self.segments for p in seg["procs"]] + [p for p, _ in self.probes]
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT if p in [q for q, _ in self.probes] else signal.SIGKILL)
        for p in procs:
            try:
                p.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
        groups = {s.proc.pid for s in self.servers}  # the masters' process group (USR2 keeps it)
        for sig, wait in ((signal.SIGTERM, self.args.grace), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.masters.values() if p.is_running()]
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, sig)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (any(s.proc.poll() is None for s in self.servers)
                                                   or self.orphans()):
                self.reap_all()
                time.sleep(0.05)
        self.reap_all()

    def orphans(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return [p for p in psutil.Process().children(recursive=True)
                    if p.status() != psutil.STATUS_ZOMBIE]
        return []

    def reap_all(self) -> None:
        for s in self.servers:
            s.proc.poll()
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return


def run(chaos: Chaos, loadgen: Path) -> Report:
    args = chaos.args
    rng = chaos.rng
    rep = Report(args=args, chaos=chaos)
    rep.load_before = os.getloadavg()
    chaos.start()
    say(f"# lancelotd master {chaos.master()} on {HOST}:{chaos.port}; run directory {chaos.run_dir}")
    deadline = time.monotonic() + 30
    while not chaos.settled(2) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # idle: the figures to compare with the end's
    rep.start_processes = chaos.processes()
    total = int(args.minutes * 60)
    t_start = time.monotonic()
    t_end = t_start + total
    t_chaos_end = t_end - min(CALM, total / 4)
    rep.t0_ns, rep.t0_wall = time.monotonic_ns(), time.time()
    chaos.start_probes(total)
    chaos.start_segment(loadgen, min(args.segment, total))
    time.sleep(1.0)
    say(f"# chaos for {t_chaos_end - time.monotonic():.0f} s, then {t_end - t_chaos_end:.0f} s calm "
        "(a last HUP; answers must converge)")
    next_op = time.monotonic() + rng.expovariate(1 / args.interval)
    names, weights = zip(*OPERATIONS.items(), strict=True)
    next_sample = 0.0
    while time.monotonic() < t_chaos_end:
        if time.monotonic() >= next_sample:
            rep.loads.append(os.getloadavg()[0])
            next_sample = time.monotonic() + 1.0
        chaos.follow_upgrade()
        if chaos.segment_done() and time.monotonic() < t_end - 1:
            chaos.start_segment(loadgen, int(min(args.segment, t_end - time.monotonic())))
        if time.monotonic() >= next_op:
            getattr(chaos, rng.choices(names, weights)[0])()
            next_op = time.monotonic() + rng.expovariate(1 / args.interval)
        time.sleep(0.02)
    # Calm: the last upgrade finishes, one more HUP brings the answer and the worker count back.
    deadline = time.monotonic() + 60
    while len(chaos.live_masters()) > 1 and time.monotonic() < deadline:
        chaos.segment_done()
        time.sleep(0.1)
    header = chaos.header()
    reloads = (header.reloads if header else 0) + 1
    chaos.hup()
    rep.final_colour = chaos.colour
    settle_from = time.monotonic()
    while not chaos.settled(2, reloads) and time.monotonic() < settle_from + 60:
        if chaos.segment_done() and time.monotonic() < t_end - 1:
            chaos.start_segment(loadgen, int(min(args.segment, t_end - time.monotonic())))
        time.sleep(0.05)
    rep.settled_s = time.monotonic() - settle_from if chaos.settled(2, reloads) else None
    rep.converge_from_ns = time.monotonic_ns()
    while time.monotonic() < t_end or not chaos.segment_done():
        if chaos.segment_done() and time.monotonic() < t_end - 1:
            chaos.start_segment(loadgen, int(min(args.segment, t_end - time.monotonic())))
        if time.monotonic() > t_end + args.segment + 60:
            raise BenchError("loadgen did not finish")
        time.sleep(0.1)
    for proc, _out in chaos.probes:
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired as e:
            raise BenchError("a probe did not finish") from e
    time.sleep(1.0)  # idle again
    rep.end_processes = chaos.processes()
    rep.load_after = os.getloadavg()
    return rep


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: chosen and printed)")
    p.add_argument("--interval", type=float, default=2.0, help="mean seconds between operations (default 2)")
    p.add_argument("--segment", type=int, default=10, help="seconds per loadgen run (default 10)")
    p.add_argument("--clients", type=int, default=50, help="clients of each kind (default 50)")
    p.add_argument("--probe-conns", type=int, default=10,
                   help="of which run in the Python probe, failures attributed per connection (default 10)")
    p.add_argument("--timeout-ms", type=int, default=10000,
                   help="a request unanswered this long is a failure (default 10000)")
    p.add_argument("--max-requests", type=int, default=20000,
                   help="max_requests in the config (default 20000)")
    p.add_argument("--max-requests-jitter", type=int, default=10000, help="its jitter (default 10000)")
    p.add_argument("--loadgen-src", type=Path, default=DEFAULT_LOADGEN_SRC)
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/lancelotd-bench"),
                   help="where loadgen is built (default /tmp/lancelotd-bench)")
    p.add_argument("--lancelotd-cmd", default=shlex.join([sys.executable, "-m", "lancelotd", "serve"]),
                   help="serves in the foreground; '-c CONFIG -b HOST:PORT -w 2 --pid-file PATH' is appended")
    p.add_argument("--start-timeout", type=float, default=20.0)
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL at the end")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    if args.minutes <= 0 or not 0 < args.probe_conns < args.clients:
        p.error("--minutes must be positive and 0 < --probe-conns < --clients")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    subreaper = become_subreaper()  # USR2's new master is orphaned at birth: we adopt and reap it
    run_dir = Path(tempfile.mkdtemp(prefix="lancelotd-chaos-"))
    chaos = Chaos(args, run_dir)
    rep = None
    failures: list[str] = []
    try:
        soft, hard = raise_nofile()
        say(f"# chaos.py --minutes {args.minutes:g} --seed {args.seed}; {os.cpu_count()} CPUs, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; Python {sys.version.split()[0]}; "
            f"RLIMIT_NOFILE {soft}; subreaper={subreaper}")
        loadgen, _ = build(args.loadgen_src.resolve(), args.build_dir)
        rep = run(chaos, loadgen)
    except BenchError as e:
        failures.append(str(e))
        say(f"\nERROR: {e}")
    except KeyboardInterrupt:
        failures.append("interrupted")
        say("\nINTERRUPTED")
    finally:
        chaos.stop_all()
        left = chaos.orphans()
        say(f"# stopped and reaped: {len(chaos.masters)} masters and their workers, "
            f"{2 * len(chaos.segments)} loadgen runs, {len(chaos.probes)} probes; still running: {len(left)}")
    if rep is not None:
        failures += report(rep)
        say(memory_table(rep))
    say(f"# log kept: {chaos.run_dir / 'lancelotd.log'}")
    say(f"\nRESULT: {'PASS' if not failures else 'FAIL'}" + "".join(f"\n  - {f}" for f in failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
