#!/usr/bin/env python3
"""An hour of chaos: mixed clients while a schedule reloads, resizes, upgrades (one upgrade in ten
to a broken release) and SIGKILLs workers; a report with plots; nothing may be lost or leak.

chaos.py's machinery (the daemon, loadgen segments, the SIGKILL of a frozen worker and the
attribution of failures to it, the colour check) plus: clients that retry once, slow readers, a
'?' flooder and idle connections (soak_clients.py); USR2 on a timetable, every --broken-every'th
to a broken release cycling over the failure matrix; memory and descriptors of every process every
--sample seconds; a check of the run directory after the final stop; plots and report.md
(soak_report.py).  See README.md.

Run as a script, with lancelotd importable: python benchmarks/soak.py [--minutes 60] [--seed N].
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from bench import DEFAULT_LOADGEN_SRC, HOST, BenchError, become_subreaper, build, raise_nofile, say
from chaos import CALM, OPERATIONS, Chaos, socket_inodes
from chaos_report import Report, memory_table, report
from soak_report import judge

HERE = Path(__file__).resolve().parent
# The kinds of a broken release (docs/DESIGN.md, "Failure matrix"): LANCELOTD_TEST_UPGRADE_FAULT_FILE
# names the first five; "boot" is worker 2 of the successor failing at boot.
BROKEN = ("exec", "before-files", "files-error", "after-go", "after-done", "boot")
IDLE_TIMEOUT = 30  # the config's; idle clients wait less than this between questions
RESOLVE_TIMEOUT = 120.0  # seconds for an upgrade to complete or fail (its own timeout is 30 s)


def unix_inodes() -> set[int]:
    """The inodes of every Unix socket of the machine (/proc/net/unix: small, unlike the TCP table
    under a connect-per-request load)."""
    found = set()
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) >= 7 and fields[6].isdigit():
                found.add(int(fields[6]))
    return found


class Soak(Chaos):
    """Chaos, plus the upgrade timetable with broken releases, the samples and the extra clients."""

    config_extra = f"\n[protocol]\nidle_timeout = {IDLE_TIMEOUT}\n"

    def __init__(self, args: argparse.Namespace, run_dir: Path, out_dir: Path) -> None:
        super().__init__(args, run_dir)
        self.out_dir = out_dir
        self.fault_file = out_dir / "upgrade-fault"  # outside the run directory: it is not a leftover
        self.boot_trigger = out_dir / "fail-boot-trigger"
        self.upgrade: dict | None = None  # the USR2 under way
        self.upgrades: list[dict] = []  # every USR2 sent, with its outcome
        self.broken_sent = 0
        self.boot_hup_at = 0.0  # the HUP sent so that a "boot" fault spares the running master
        self.samples: list[dict] = []  # one row per process per sample
        self.mixed: tuple[subprocess.Popen, Path] | None = None

    def start(self) -> None:
        self.fault_file.write_text("")
        # Given to the first master, and so to every successor (they exec with its environment).
        os.environ["LANCELOTD_TEST_UPGRADE_FAULT_FILE"] = str(self.fault_file)
        os.environ["LANCELOTD_TEST_FAIL_BOOT"] = "1:2"
        os.environ["LANCELOTD_TEST_FAIL_BOOT_IF"] = str(self.boot_trigger)
        super().start()

    # --- the upgrade timetable ------------------------------------------------------------

    def generation(self) -> int:
        header = self.header()
        return header.generation if header is not None and not header.reload_pending else 0

    def usr2(self) -> bool:
        """Send the next USR2 of the timetable; False if it must wait (an upgrade under way, or a
        'boot' fault whose master still runs generation 1, which the fault would hit too)."""
        if self.upgrade is not None or len(self.live_masters()) > 1:
            return False
        number = len(self.upgrades) + 1
        kind = None
        if number % self.args.broken_every == 0:
            kind = BROKEN[(self.broken_sent + self.args.seed) % len(BROKEN)]
            if kind == "boot" and self.generation() <= 1:
                if self.generation() == 1 and time.monotonic() > self.boot_hup_at + 10:
                    self.hup()  # then generation 2: only the successor's worker 2 (generation 1) fails
                    self.boot_hup_at = time.monotonic()
                return False
        old = self.master()
        if old is None:
            return False
        offset = self.log.stat().st_size
        if kind == "boot":
            self.boot_trigger.touch()
        elif kind is not None:
            self.fault_file.write_text(kind)
        if not self.signal_master(signal.SIGUSR2, f"USR2 #{number}" + (f" (broken: {kind})" if kind else "")):
            self.clear_fault()
            return False
        self.ops["usr2"] += 1
        self.broken_sent += kind is not None
        self.upgrade = {"number": number, "kind": kind, "old": old, "sent": time.monotonic(),
                        "t": time.monotonic_ns(), "offset": offset, "outcome": None}
        self.upgrades.append(self.upgrade)
        return True

    def clear_fault(self) -> None:
        self.fault_file.write_text("")
        with contextlib.suppress(FileNotFoundError):
            self.boot_trigger.unlink()

    def log_since(self, offset: int) -> str:
        with open(self.log, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def follow_upgrade(self) -> None:
        """A broken USR2 must end with 'upgrade failed' and the old master serving (the PID file
        its, a new connection answered); a healthy one with a new master and the old one gone."""
        up = self.upgrade
        if up is None:
            return
        old, text = up["old"], self.log_since(up["offset"])
        failed = next((line for line in text.splitlines() if f"[{old}] master: upgrade failed" in line), None)
        # "USR2: an upgrade or reload is under way: ignored", "USR2 ignored: ...", "USR2 refused: ..."
        refused = f"[{old}] master: USR2" in text
        age = time.monotonic() - up["sent"]
        new = self.master()
        if up["kind"] is not None and refused and failed is None:
            up["outcome"] = "refused (a reload or upgrade under way)"  # the daemon's rule: not a failure
            up["log"] = ""
            self.clear_fault()
        elif up["kind"] is not None:
            if failed is None and age < RESOLVE_TIMEOUT:
                return
            if failed is not None and not up.get("answered"):
                up["answered"] = new == old and self.answers_now()
            if failed is not None and not up["answered"] and age < RESOLVE_TIMEOUT:
                return  # the old master restores its files: a moment
            alive = old in [p.pid for p in self.live_masters()]
            ok = failed is not None and alive and new == old and up.get("answered", False)
            up["outcome"] = "as expected: upgrade failed, the old master serves" if ok else (
                f"WRONG: failed={failed is not None}, old master alive={alive}, PID file names {new}, "
                f"a new connection answered={up.get('answered', False)}")
            up["log"] = failed or ""
            self.clear_fault()
        else:
            old_gone = old not in [p.pid for p in self.live_masters()]
            if failed is None and not refused and not (new != old and old_gone) and age < RESOLVE_TIMEOUT:
                return
            if refused and failed is None:
                up["outcome"] = "refused (another upgrade under way)"
            else:
                up["outcome"] = ("as expected: completed" if failed is None and new != old and old_gone
                                 else f"WRONG: failed={failed is not None}, PID file names {new}, "
                                 f"old master gone={old_gone}")
            up["log"] = failed or ""
        up["resolved_s"] = age
        self.note(f"USR2 #{up['number']}: {up['outcome']} after {age:.1f} s")
        self.upgrade = None

    def answers_now(self) -> bool:
        """A new connection is answered within 1 s."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as s:
                s.settimeout(1.0)
                s.sendall(b"What is your quest?")
                got = b""
                while not got.endswith(b"."):
                    data = s.recv(64)
                    if not data:
                        return False
                    got += data
                return got == b"To seek the Holy Grail."
        except OSError:
            return False

    # --- samples ---------------------------------------------------------------------------

    def sample(self) -> None:
        """RSS, USS and descriptors of every process of every live master; how many of those are
        TCP sockets (clients, listeners: the rest, pipes, Unix sockets, files, must stay flat)."""
        t = time.monotonic_ns()
        current = self.master()
        rows = []
        for master in self.live_masters():
            procs = [(master, "master")]
            with contextlib.suppress(psutil.Error):
                procs += [(p, "worker") for p in master.children()]
            for proc, role in procs:
                try:
                    mem = proc.memory_full_info()
                    fds = proc.num_fds()
                except psutil.Error:
                    continue
                rows.append({"t": t, "pid": proc.pid, "role": role, "master": master.pid,
                             "current": master.pid == current, "rss": mem.rss, "uss": mem.uss, "fds": fds,
                             "sockets": socket_inodes(proc.pid)})
        unix = unix_inodes()  # read after the descriptors: a Unix socket listed there is here still
        for row in rows:
            sockets = row.pop("sockets")
            row["tcp"] = len(sockets - unix)
        self.samples += rows

    # --- clients ---------------------------------------------------------------------------

    def start_probes(self, seconds: int) -> None:
        """chaos's two probes, retrying once (soak_clients.py probe), and the mixed clients."""
        for per_request in (False, True):
            kind = "cpr" if per_request else "persistent"
            out = self.out_dir / f"probe-{kind}.json"
            cmd = [sys.executable, str(HERE / "soak_clients.py"), "probe", "-H", HOST, "-p", str(self.port),
                   "-c", str(self.args.probe_conns), "-d", str(seconds), "-T", str(self.args.timeout_ms),
                   "-l", f"probe-{kind}", "--out", str(out)] + (["-r"] if per_request else [])
            self.probes.append((self.spawn(cmd), out))
        out = self.out_dir / "mixed.json"
        a = self.args
        cmd = [sys.executable, str(HERE / "soak_clients.py"), "mixed", "-H", HOST, "-p", str(self.port),
               "-d", str(seconds), "--slow", str(a.slow), "--flood", str(a.flood), "--idle", str(a.idle),
               "--idle-min", "5", "--idle-max", str(IDLE_TIMEOUT - 10), "--out", str(out)]
        self.mixed = (self.spawn(cmd), out)

    def spawn(self, cmd: list[str]) -> subprocess.Popen:
        self.commands.append(shlex.join(cmd))
        say("$ " + shlex.join(cmd) + " &")
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    def stop_all(self) -> None:
        if self.mixed is not None and self.mixed[0].poll() is None:
            self.mixed[0].send_signal(signal.SIGINT)
            try:
                self.mixed[0].communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.mixed[0].kill()
                self.mixed[0].communicate()
        super().stop_all()

    def final_stop(self, timeout: float) -> bool:
        """TERM the live masters alone (the service's own stop) and wait: True if all exited."""
        for proc in self.live_masters():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.reap_all()
            if not self.live_masters() and not self.orphans():
                return True
            time.sleep(0.1)
        return False

    def leftovers(self) -> list[str]:
        """After the final stop the run directory holds the config and the log, nothing else."""
        ours = ("lancelotd.toml", "lancelotd.log")
        return sorted(p.name for p in self.run_dir.iterdir() if p.name not in ours)


def loop_until(soak: Soak, rep: Report, loadgen: Path, until: float, t_end: float, chaos_on: bool) -> None:
    """Run the clients' segments, the samples and (if chaos_on) the operations until `until`."""
    args, rng = soak.args, soak.rng
    names, weights = zip(*[(k, v) for k, v in OPERATIONS.items() if k != "usr2"], strict=True)
    next_op = time.monotonic() + rng.expovariate(1 / args.interval)
    next_usr2 = time.monotonic() + args.usr2_interval
    while time.monotonic() < until:
        now = time.monotonic()
        if now >= soak.next_sample:
            soak.sample()
            rep.loads.append(os.getloadavg()[0])
            soak.next_sample = now + args.sample
        soak.follow_upgrade()
        if soak.segment_done() and now < t_end - 1:
            soak.start_segment(loadgen, int(min(args.segment, t_end - now)))
        if chaos_on and now >= next_usr2 and soak.usr2():
            next_usr2 = now + args.usr2_interval
        if chaos_on and now >= next_op:
            getattr(soak, rng.choices(names, weights)[0])()
            next_op = now + rng.expovariate(1 / args.interval)
        if not chaos_on and soak.upgrade is None:
            return
        time.sleep(0.02)


def run(soak: Soak, loadgen: Path) -> Report:
    args = soak.args
    rep = Report(args=args, chaos=soak)
    rep.load_before = os.getloadavg()
    soak.start()
    say(f"# lancelotd master {soak.master()} on {HOST}:{soak.port}; run directory {soak.run_dir}")
    deadline = time.monotonic() + 30
    while not soak.settled(2) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    rep.start_processes = soak.processes()
    total = int(args.minutes * 60)
    t_end = time.monotonic() + total
    t_chaos_end = t_end - min(CALM, total / 4)
    rep.t0_ns, rep.t0_wall = time.monotonic_ns(), time.time()
    soak.next_sample = 0.0
    soak.start_probes(total)
    soak.start_segment(loadgen, min(args.segment, total))
    say(f"# chaos for {t_chaos_end - time.monotonic():.0f} s (USR2 every {args.usr2_interval:g} s, one in "
        f"{args.broken_every} to a broken release), then {t_end - t_chaos_end:.0f} s calm")
    loop_until(soak, rep, loadgen, t_chaos_end, t_end, chaos_on=True)
    # Calm: the last upgrade resolves; a last HUP brings the answer and the worker count back.
    loop_until(soak, rep, loadgen, time.monotonic() + RESOLVE_TIMEOUT, t_end, chaos_on=False)
    header = soak.header()
    reloads = (header.reloads if header else 0) + 1
    soak.hup()
    rep.final_colour = soak.colour
    settle_from = time.monotonic()
    # Judged when seen, not by asking again: under the flooder a worker recycles (max_requests)
    # about once a second, and while it hands its connections over there are 3 workers a while.
    while rep.settled_s is None and time.monotonic() < settle_from + 60:
        if soak.settled(2, reloads):
            rep.settled_s = time.monotonic() - settle_from
        if soak.segment_done() and time.monotonic() < t_end - 1:
            soak.start_segment(loadgen, int(min(args.segment, t_end - time.monotonic())))
        time.sleep(0.05)
    rep.converge_from_ns = time.monotonic_ns()
    while time.monotonic() < t_end or not soak.segment_done():
        if soak.segment_done() and time.monotonic() < t_end - 1:
            soak.start_segment(loadgen, int(min(args.segment, t_end - time.monotonic())))
        if time.monotonic() >= soak.next_sample:
            soak.sample()
            soak.next_sample = time.monotonic() + args.sample
        if time.monotonic() > t_end + args.segment + 60:
            raise BenchError("loadgen did not finish")
        time.sleep(0.1)
    for proc, _out in [*soak.probes, soak.mixed]:
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired as e:
            raise BenchError("a client did not finish") from e
    time.sleep(1.0)
    rep.end_processes = soak.processes()
    rep.load_after = os.getloadavg()
    return rep


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=60.0, help="length of the run (default 60)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: chosen and printed)")
    p.add_argument("--out", type=Path, default=None,
                   help="report directory (default: /tmp/lancelotd-soak-*/report)")
    p.add_argument("--interval", type=float, default=2.0,
                   help="mean seconds between HUP/TTIN/TTOU/SIGKILL (default 2)")
    p.add_argument("--usr2-interval", type=float, default=None,
                   help="seconds between USR2s (default 30; 20 under 10 minutes)")
    p.add_argument("--broken-every", type=int, default=None,
                   help="every Nth USR2 goes to a broken release (default 10; 2 under 10 minutes)")
    p.add_argument("--sample", type=float, default=10.0, help="seconds between memory samples (default 10)")
    p.add_argument("--warmup-minutes", type=float, default=None,
                   help="not judged for flatness (default 5; a third of the run under 15 minutes)")
    p.add_argument("--flat-limit", type=float, default=1.0,
                   help="largest slope, %% per 10 minutes, of memory and descriptors (default 1)")
    p.add_argument("--short-flat-limit", type=float, default=10.0,
                   help="the limit when under 10 minutes are judged: too short for 1%% (default 10)")
    p.add_argument("--segment", type=int, default=10, help="seconds per loadgen run (default 10)")
    p.add_argument("--clients", type=int, default=50, help="persistent and per-request clients of each kind")
    p.add_argument("--probe-conns", type=int, default=10, help="of which in the Python probe (default 10)")
    p.add_argument("--slow", type=int, default=4, help="slow readers (default 4)")
    p.add_argument("--flood", type=int, default=1, help="'?' flooders (default 1)")
    p.add_argument("--idle", type=int, default=20, help="idle connections (default 20)")
    p.add_argument("--timeout-ms", type=int, default=10000)
    p.add_argument("--max-requests", type=int, default=20000)
    p.add_argument("--max-requests-jitter", type=int, default=10000)
    p.add_argument("--loadgen-src", type=Path, default=DEFAULT_LOADGEN_SRC)
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/lancelotd-bench"))
    p.add_argument("--lancelotd-cmd", default=shlex.join([sys.executable, "-m", "lancelotd", "serve"]))
    p.add_argument("--start-timeout", type=float, default=20.0)
    p.add_argument("--grace", type=float, default=10.0)
    args = p.parse_args(argv)
    short = args.minutes < 10
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    if args.usr2_interval is None:
        args.usr2_interval = 20.0 if short else 30.0
    if args.broken_every is None:
        args.broken_every = 2 if short else 10
    if args.warmup_minutes is None:
        args.warmup_minutes = args.minutes / 3 if args.minutes < 15 else 5.0
    if args.minutes <= 0 or not 0 < args.probe_conns < args.clients or args.broken_every < 1:
        p.error("--minutes must be positive, 0 < --probe-conns < --clients, --broken-every >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    subreaper = become_subreaper()
    base = Path(tempfile.mkdtemp(prefix="lancelotd-soak-"))
    run_dir = base / "run"
    out_dir = args.out or base / "report"
    run_dir.mkdir()
    out_dir.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, run_dir, out_dir)
    rep = None
    failures: list[str] = []
    stopped_cleanly = False
    try:
        soft, _ = raise_nofile()
        say(f"# soak.py --minutes {args.minutes:g} --seed {args.seed}; {os.cpu_count()} CPUs, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; Python {sys.version.split()[0]}; "
            f"RLIMIT_NOFILE {soft}; subreaper={subreaper}; report in {out_dir}")
        loadgen, _ = build(args.loadgen_src.resolve(), args.build_dir)
        rep = run(soak, loadgen)
        stopped_cleanly = soak.final_stop(args.grace + 40)
    except BenchError as e:
        failures.append(str(e))
        say(f"\nERROR: {e}")
    except KeyboardInterrupt:
        failures.append("interrupted")
        say("\nINTERRUPTED")
    finally:
        soak.stop_all()
        left = soak.orphans()
        say(f"# stopped and reaped: {len(soak.masters)} masters and their workers, "
            f"{2 * len(soak.segments)} loadgen runs, {len(soak.probes) + 1} client processes; "
            f"still running: {len(left)}")
    if rep is not None:
        leftovers = soak.leftovers()
        (out_dir / "samples.json").write_text(json.dumps(soak.samples))  # the raw figures, before judging
        (out_dir / "upgrades.json").write_text(json.dumps(soak.upgrades))
        failures += report(rep)
        say(memory_table(rep))
        failures += judge(rep, soak, out_dir, leftovers, stopped_cleanly, failures)
    say(f"# log kept: {soak.log if rep else run_dir}; report: {out_dir / 'report.md'}")
    say(f"\nRESULT: {'PASS' if not failures else 'FAIL'}" + "".join(f"\n  - {f}" for f in failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
