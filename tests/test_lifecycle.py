"""docs/PROMISES.md §1-§2 with real daemons: reload, upgrade, pool size, log reopen, supervision.

Every test runs real `lancelotd serve` processes (the `start_daemon` fixture,
which kills and reaps the whole process group at teardown), sends them real
signals and talks to them over real TCP on loopback.  Waits are on readiness
signals: the PID file, a log line, a connect, psutil.  The only sleeps are the
pauses of a load pattern (HUPs 0.2 s apart, a signal 0.5 s into a load run) and
one observation window (the boot back-off test counts spawns over ~3 s).

Retiring a worker may mean draining its connections or handing them to a
current worker; the tests hold the client-visible contract (the client is
answered, never reset; the retired process is gone once its client is), and
where a retired process must stay, they make it stay the same way for both:
a `Backlog` client owes it answers it cannot send yet.

The loads come from the C load generator benchmarks/c/loadgen.c (or, where
it cannot be built, its Python twin tests/pyload.py), built once per session by
conftest's `loadgen` fixture.  The test session is a child subreaper (conftest),
so the new master of a USR2, orphaned when the old one exits, is ours to reap
(this machine's PID 1 reaps nobody).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    LISTENING,
    NAME_A,
    NAME_Q,
    TOO_LONG,
    Asker,
    Backlog,
    Daemon,
    ask,
    ask_on,
    clean_env,
    gone,
    holder_of,
    live_children,
    read,
    read_pid,
    ready_from,
    recv_all,
    scaled,
    title,
    wait_child_exit,
    wait_for,
    wait_log,
    wait_pool,
    workers_of,
)
from loadgen import assert_no_errors, load

from lancelotd.scoreboard import SERVING, Counters, Scoreboard, Slot

COLOR_Q = b"Color?"
DEFAULT_ANSWERS = """
"What is your name?" = "My name is Sir Lancelot of Camelot."
"What is your quest?" = "To seek the Holy Grail."
"What is your favorite color?" = "Blue."
"""


def config(workers: int = 2, color: str = "Blue.", unknown: str = "No idea.", max_question_bytes: int = 64,
           graceful_timeout: float = 10, extra: str = "", lifecycle: str = "", tail: str = "",
           default_questions: bool = True) -> str:
    """A complete config file: the default questions (loadgen checks them) plus `Color?`.

    `extra` goes into [server], `lifecycle` into [lifecycle], `tail` (more tables) at the end.
    """
    return f"""
[server]
workers = {workers}
{extra}
[protocol]
unknown_answer = "{unknown}"
max_question_bytes = {max_question_bytes}

[lifecycle]
graceful_timeout = {graceful_timeout}
{lifecycle}
[answers]
{DEFAULT_ANSWERS if default_questions else ""}
"Color?" = "{color}"
{tail}
"""


# --- processes -------------------------------------------------------------------

def group_members(pgid: int, zombies: bool = True) -> list[psutil.Process]:
    """Every process in the process group (the harness puts each daemon in its own)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and (zombies or proc.status() != psutil.STATUS_ZOMBIE):
                members.append(proc)
        except (OSError, psutil.Error):
            pass
    return members


def describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} ppid={p.ppid()} {p.status()} {title(p)!r}")
        except psutil.Error:
            out.append(f"{p.pid} (gone)")
    return "; ".join(out)


def assert_nothing_left(pgid: int) -> None:
    try:
        wait_for(lambda: not group_members(pgid), 5, "no process left in the daemon's group")
    except AssertionError as e:
        raise AssertionError(f"{e}: {describe(group_members(pgid))}") from None


# --- logs ------------------------------------------------------------------------

def assert_clean_log(text: str) -> None:
    """Nothing went wrong: not one warning or error line."""
    bad = re.findall(r"^.* (?:WARNING|ERROR|CRITICAL) .*$", text, re.M)
    assert bad == [], "\n".join(bad[:10])


def listening(path: Path) -> dict[str, int]:
    """host -> port of every 'listening on' line of the log."""
    return {m.group(1): int(m.group(2)) for m in LISTENING.finditer(read(path))}


# =================================================================================
# 1. HUP applies every kind of setting
# =================================================================================

def test_hup_applies_answers_limits_and_worker_count(start_daemon):
    d = start_daemon(config=config(workers=2, color="Blue.", unknown="No idea.", max_question_bytes=64,
                                   default_questions=False))
    gen1 = wait_pool(d.proc.pid, 2, generation=1)
    assert d.ask(COLOR_Q) == b"Blue."
    assert d.ask(b"Huh?") == b"No idea."
    assert d.ask(b"x" * 20 + b"?") == b"No idea."  # 21 bytes: within 64
    with d.connect() as old:
        assert ask_on(old, COLOR_Q) == b"Blue."  # held by a generation-1 worker

        d.config_file.write_text(
            config(workers=3, color="Green.", unknown="Who knows.", max_question_bytes=16,
                   default_questions=False))
        d.signal(signal.SIGHUP)
        wait_log(d.log_file, r"reload done: generation 2 serving with 3 workers")

        # New connections get the new generation's settings.
        assert d.ask(COLOR_Q) == b"Green."
        assert d.ask(b"Huh?") == b"Who knows."
        with d.connect() as sock:
            sock.sendall(b"x" * 20 + b"?")
            sock.settimeout(scaled(5))
            assert recv_all(sock) == TOO_LONG  # then an orderly close
        # The connection held over the reload is still answered (by its old worker draining,
        # or by a new one it was handed to): never reset.
        assert ask_on(old, COLOR_Q) in (b"Blue.", b"Green.")
        assert ask_on(old, b"Huh?") in (b"No idea.", b"Who knows.")
    gen2 = wait_pool(d.proc.pid, 3, generation=2)
    assert not set(gen1) & set(gen2)
    assert sorted(n for n, _ in gen2.values()) == [1, 2, 3]
    titles = [title(psutil.Process(pid)) for pid in gen2]
    assert all("[gen 2]" in t for t in titles), titles


def test_hup_switches_the_log_file(start_daemon, tmp_path):
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    d = start_daemon(config=config(tail=f'[log]\nfile = "{first}"'), wait=False)
    ready_from(d, first, 2)
    assert "master started" in read(first)

    d.config_file.write_text(config(tail=f'[log]\nfile = "{second}"'))
    d.signal(signal.SIGHUP)
    wait_log(second, r"master: reload done: generation 2")
    gen2 = wait_pool(d.proc.pid, 2, generation=2)
    # A line from a new worker: retire worker 2 of generation 2; it logs its exit.
    d.signal(signal.SIGTTOU)
    pid2 = next(pid for pid, (number, _) in gen2.items() if number == 2)
    wait_log(second, rf"\[{pid2}\] worker 2: exiting")
    wait_log(second, rf"master: worker 2 \(pid {pid2}, gen 2\) exited")
    old = read(first)
    assert "reload done" not in old and "TTOU" not in old and f"[{pid2}]" not in old, old[-2000:]
    assert d.ask(NAME_Q) == NAME_A


def test_hup_changes_bind_addresses(start_daemon):
    # 127.0.0.1:0 stays, 127.0.0.2:0 goes, 127.0.0.3:0 comes (each port learned from the log).
    bind1 = 'bind = ["127.0.0.1:0", "127.0.0.2:0"]'
    bind2 = 'bind = ["127.0.0.1:0", "127.0.0.3:0"]'
    d = start_daemon(config=config(extra=bind1), default_bind=False)
    wait_pool(d.proc.pid, 2, generation=1)
    ports = listening(d.log_file)
    kept, removed = ports["127.0.0.1"], ports["127.0.0.2"]
    assert ask(kept, NAME_Q) == NAME_A
    assert ask(removed, NAME_Q, "127.0.0.2") == NAME_A

    with Asker(kept) as asker:  # the unchanged address keeps answering throughout
        d.config_file.write_text(config(extra=bind2))
        d.signal(signal.SIGHUP)
        wait_log(d.log_file, r"reload done: generation 2")
        added = listening(d.log_file)["127.0.0.3"]
        assert ask(added, NAME_Q, "127.0.0.3") == NAME_A
        wait_pool(d.proc.pid, 2, generation=2)  # generation 1 has let go of its copies
        with pytest.raises(ConnectionRefusedError):
            ask(removed, NAME_Q, "127.0.0.2", timeout=2)
        assert ask(kept, NAME_Q) == NAME_A
        wait_for(lambda: asker.ok > 20, 5, "more answers on the kept address")
    assert not asker.bad(), asker.outcomes
    assert "no longer listening on 127.0.0.2:0" in d.log()
    assert listening(d.log_file)["127.0.0.1"] == kept  # never re-bound


# =================================================================================
# 2. An invalid config on HUP changes nothing
# =================================================================================

def test_invalid_config_on_hup_is_refused_and_nothing_changes(start_daemon):
    d = start_daemon(config=config(color="Blue."))
    gen1 = wait_pool(d.proc.pid, 2, generation=1)

    d.config_file.write_text(config(color="Green.").replace("max_question_bytes = 64",
                                                            'max_question_bytes = "big"'))
    d.signal(signal.SIGHUP)
    wait_log(d.log_file, r"reload refused: .*protocol\.max_question_bytes")
    assert d.ask(COLOR_Q) == b"Blue."
    assert workers_of(d.proc.pid) == gen1

    d.config_file.write_text("this is [[ not TOML\n")
    d.signal(signal.SIGHUP)
    wait_log(d.log_file, r"reload refused: .*not valid TOML")
    assert d.ask(COLOR_Q) == b"Blue."
    assert workers_of(d.proc.pid) == gen1
    assert "gen 2" not in d.log()  # no worker of a new generation was ever started

    # Still able to reload once the file is fixed.
    d.config_file.write_text(config(color="Green."))
    d.signal(signal.SIGHUP)
    wait_log(d.log_file, r"reload done: generation 2")
    assert d.ask(COLOR_Q) == b"Green."


# =================================================================================
# 3. A new generation that cannot boot; workers that keep dying at boot
# =================================================================================

def test_failing_new_generation_keeps_the_old_one(start_daemon):
    d = start_daemon(config=config(color="Blue."), env={"LANCELOTD_TEST_FAIL_BOOT": "2"})
    gen1 = wait_pool(d.proc.pid, 2, generation=1)

    d.config_file.write_text(config(color="Green."))
    d.signal(signal.SIGHUP)
    wait_log(d.log_file, r"reload failed: .*generation 1 keeps serving")
    assert "failing at boot" in d.log()
    assert wait_pool(d.proc.pid, 2) == gen1  # the failed generation's leftovers are gone
    assert d.ask(COLOR_Q) == b"Blue."
    assert d.proc.poll() is None


def test_boot_failures_back_off(start_daemon):
    """The window is not scaled: the back-off's delays are the daemon's own (0.2 s doubling), so a
    longer window would count more attempts; a slow machine only makes fewer, which the lower
    bound allows for."""
    d = start_daemon(config=config(workers=2), env={"LANCELOTD_TEST_FAIL_BOOT": "1"})
    wait_log(d.log_file, r"next spawn in")
    time.sleep(3.0)  # the observation window: how often does it try in ~3 s?
    log = d.log()
    spawns = len(re.findall(r"spawned worker", log))
    delays = [float(x) for x in re.findall(r"next spawn in ([\d.]+)s", log)]
    assert d.proc.poll() is None, "the master gave up"
    assert d.pid_file.exists()
    assert 3 <= spawns < 12, f"{spawns} spawn attempts in ~3 s:\n{log[-3000:]}"
    assert len(delays) >= 3 and delays == sorted(delays) and delays[-1] > delays[0], delays


# =================================================================================
# 4. A storm of HUPs under load drops nothing
# =================================================================================

def settled(d: Daemon, workers: int, timeout: float = 20.0) -> int:
    """Wait for the end of all reloads; the generation then serving (all `workers` of it)."""
    def done() -> int | None:
        log = d.log()
        started = len(re.findall(r"master: reloading ", log))
        ended = re.findall(r"master: (reload done: generation (\d+)|reload failed|reload refused)", log)
        if not ended or started != len(ended) or not ended[-1][1]:
            return None
        generation = int(ended[-1][1])
        pool = workers_of(d.proc.pid)
        live = live_children(d.proc.pid)
        if live is None or len(live) != workers or len(pool) != workers:
            return None
        return generation if all(g == generation for _, g in pool.values()) else None
    return wait_for(done, timeout, f"the last reload done and {workers} workers of its generation")  # type: ignore


@pytest.mark.parametrize("per_request", [False, True], ids=["persistent", "connect-per-request"])
def test_hup_storm_under_load_drops_nothing(start_daemon, loadgen, per_request):
    d = start_daemon(config=config(workers=2))
    wait_pool(d.proc.pid, 2, generation=1)
    with load(loadgen, d.port, conns=50, seconds=3.0, per_request=per_request) as result:
        time.sleep(0.4)
        for _ in range(10):
            d.signal(signal.SIGHUP)
            time.sleep(0.2)
    assert_no_errors(result)
    generation = settled(d, 2)
    assert generation >= 3, d.log()[-3000:]
    assert_clean_log(d.log())  # no failed reload, no worker lost, no accept error...
    assert d.ask(NAME_Q) == NAME_A


# =================================================================================
# 5. USR2 upgrade, and its rollback
# =================================================================================

def test_usr2_upgrade_under_load(start_daemon, loadgen):
    d = start_daemon(config=config(workers=2, graceful_timeout=scaled(15)))  # our client is served before it
    old_workers = wait_pool(d.proc.pid, 2, generation=1)
    old_pid = d.proc.pid
    oldbin = Path(str(d.pid_file) + ".oldbin")
    assert read_pid(d.pid_file) == old_pid

    with d.connect() as holder:
        assert ask_on(holder, NAME_Q) == NAME_A
        assert holder_of(holder, list(old_workers)) is not None
        # Keep an old worker busy with this client: the old master has to wait for it.
        backlog = Backlog(holder).fill()
        with load(loadgen, d.port, conns=50, seconds=3.0) as result:
            time.sleep(0.5)
            d.signal(signal.SIGUSR2)
            new_pid = wait_for(lambda: (read_pid(d.pid_file) or old_pid) != old_pid and read_pid(d.pid_file),
                               10, "a new PID in the PID file")
            wait_log(d.log_file, rf"upgrade: new master {new_pid} is ready")
            wait_pool(new_pid, 2, generation=1)
            assert d.ask(NAME_Q) == NAME_A
        assert_no_errors(result)
        # The old master drains, under the .oldbin name, while our client is served.
        assert read_pid(oldbin) == old_pid
        assert d.proc.poll() is None
        assert read_pid(d.pid_file) == new_pid
        backlog.settle()
        assert ask_on(holder, NAME_Q) == NAME_A
    assert d.wait_exit(10) == 0  # the old master leaves once its last client has
    assert not oldbin.exists()
    assert read_pid(d.pid_file) == new_pid
    assert d.ask(NAME_Q) == NAME_A
    assert psutil.Process(new_pid).ppid() == os.getpid()  # reparented to us (the session is a subreaper)
    assert all(gone(pid) for pid in old_workers)

    assert_clean_log(d.log())
    os.kill(new_pid, signal.SIGTERM)
    assert wait_child_exit(new_pid, 10) == 0
    assert not d.pid_file.exists()
    assert_nothing_left(old_pid)


def test_usr2_rollback_when_the_new_master_fails(start_daemon):
    d = start_daemon(config=config(workers=2))
    workers = wait_pool(d.proc.pid, 2, generation=1)
    d.config_file.write_text("garbage [[[\n")
    d.signal(signal.SIGUSR2)
    line = wait_log(d.log_file, r"upgrade failed: .*")[0].group(0)
    assert "not valid TOML" in line, line  # the new master's own reason, passed back
    assert "keeps serving" in line
    assert read_pid(d.pid_file) == d.proc.pid
    assert not Path(str(d.pid_file) + ".oldbin").exists()
    assert d.ask(NAME_Q) == NAME_A
    assert workers_of(d.proc.pid) == workers
    # The new master, orphaned at birth, is ours (the subreaper's) to reap.
    new_master = int(wait_log(d.log_file, r"upgrade: new master (\d+) started")[0].group(1))
    assert wait_child_exit(new_master, 5) == 1
    members = {p.pid for p in group_members(d.proc.pid)}
    assert members == {d.proc.pid, *workers}, describe(group_members(d.proc.pid))

    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    assert_nothing_left(d.proc.pid)


# =================================================================================
# 6. TTIN / TTOU
# =================================================================================

def test_ttin_ttou(start_daemon):
    d = start_daemon(config=config(workers=2))
    master = d.proc.pid
    wait_pool(master, 2, generation=1)
    d.signal(signal.SIGTTIN)
    pool = wait_pool(master, 3, generation=1)
    by_number = {number: pid for pid, (number, _) in pool.items()}

    # A client on worker 3: stop the others for a moment so that worker 3 accepts.
    # (A stopped process is off the listener's wait queue only once it has actually stopped.)
    try:
        for n in (1, 2):
            os.kill(by_number[n], signal.SIGSTOP)
        for n in (1, 2):
            wait_for(lambda n=n: psutil.Process(by_number[n]).status() == psutil.STATUS_STOPPED, 5,
                     f"worker {n} stopped")
        client = d.connect()
        assert ask_on(client, NAME_Q) == NAME_A
    finally:
        for n in (1, 2):
            os.kill(by_number[n], signal.SIGCONT)
    with client:
        assert holder_of(client, list(pool)) == by_number[3]
        backlog = Backlog(client).fill()  # worker 3 owes this client answers it cannot send yet
        d.signal(signal.SIGTTOU)
        wait_log(d.log_file, r"TTOU: 2 workers")
        # Worker 3 retires: it accepts nothing new, but stays for the client it owes answers.
        for _ in range(5):
            assert d.ask(NAME_Q) == NAME_A
        assert not gone(by_number[3])
        assert set(workers_of(master)) == set(pool)
        backlog.settle()
        for _ in range(3):  # and the client is still served, by worker 3 or whoever took it over
            assert ask_on(client, NAME_Q) == NAME_A
    wait_for(lambda: gone(by_number[3]), 5, "worker 3 to exit (its client has left)")
    assert set(wait_pool(master, 2, generation=1)) == {by_number[1], by_number[2]}

    d.signal(signal.SIGTTOU)
    wait_log(d.log_file, r"TTOU: 1 workers")
    wait_pool(master, 1, generation=1)
    d.signal(signal.SIGTTOU)
    wait_log(d.log_file, r"TTOU: already at 1 worker")
    assert len(wait_pool(master, 1, generation=1)) == 1
    assert "TTOU: 0" not in d.log()
    assert d.ask(NAME_Q) == NAME_A

    # The count survives a worker's death ...
    d.signal(signal.SIGTTIN)
    wait_log(d.log_file, r"TTIN: 2 workers")
    d.signal(signal.SIGTTIN)
    wait_log(d.log_file, r"TTIN: 3 workers")
    pool = wait_pool(master, 3, generation=1)
    victim = next(iter(pool))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in workers_of(master) and len(workers_of(master)) == 3, 5,
             "the killed worker replaced")
    # ... until a reload, which takes the config's count again.
    d.signal(signal.SIGHUP)
    wait_log(d.log_file, r"reload done: generation 2 serving with 2 workers")
    wait_pool(master, 2, generation=2)


# =================================================================================
# 7. USR1 reopens the log files
# =================================================================================

def test_usr1_reopens_log_files(start_daemon, tmp_path):
    path = tmp_path / "served.log"
    rotated = tmp_path / "served.log.1"
    d = start_daemon("--log-file", str(path), "-w", "2", wait=False)
    ready_from(d, path, 2)
    pool = workers_of(d.proc.pid)
    pid2 = next(pid for pid, (number, _) in pool.items() if number == 2)

    os.rename(path, rotated)
    d.signal(signal.SIGUSR1)
    wait_log(path, r"log file reopened", count=3)  # the master and both workers
    reopened = read(path)
    assert re.search(rf"\[{d.proc.pid}\] master: log file reopened", reopened)
    assert re.search(rf"\[{pid2}\] worker 2: log file reopened", reopened)
    before = read(rotated)
    assert "reopened" not in before

    # A worker line (worker 2 existed before the reopen) and a master line.
    d.signal(signal.SIGTTOU)
    wait_log(path, rf"\[{pid2}\] worker 2: exiting")
    wait_log(path, rf"master: worker 2 \(pid {pid2}, gen 1\) exited")
    assert read(rotated) == before, "lines went to the renamed file after the reopen"
    assert "TTOU" in read(path)


# =================================================================================
# 8. Supervision: dead, hung and recycled workers
# =================================================================================

def test_killed_worker_is_replaced_within_a_second(start_daemon):
    d = start_daemon(config=config(workers=2))
    pool = wait_pool(d.proc.pid, 2, generation=1)
    # Past their boot: a worker killed while it boots is a boot failure (back-off), not this case.
    wait_log(d.log_file, r"ready: 2 workers serving")
    victim = next(iter(pool))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in workers_of(d.proc.pid) and len(workers_of(d.proc.pid)) == 2, 1.0,
             "a replacement within 1 s")
    wait_log(d.log_file, rf"\(pid {victim}, gen 1\) was killed by SIGKILL unexpectedly: replacing it")
    assert d.ask(NAME_Q) == NAME_A


def test_hung_worker_is_killed_and_replaced(start_daemon):
    """A stopped worker is killed after worker_timeout, and only it: the timer is scaled(1 s), so
    that on a slow machine (LANCELOTD_TEST_TIME_FACTOR) no healthy worker is taken for hung."""
    d = start_daemon(config=config(workers=2, lifecycle=f"worker_timeout = {scaled(1.0)}"))
    pool = wait_pool(d.proc.pid, 2, generation=1)
    victim = next(iter(pool))
    os.kill(victim, signal.SIGSTOP)
    wait_for(lambda: gone(victim) and len(workers_of(d.proc.pid)) == 2, 4,
             "the stopped worker killed and replaced")
    wait_log(d.log_file, rf"\(pid {victim}\) made no progress for \d+s")
    assert set(workers_of(d.proc.pid)) - {victim}
    assert d.ask(NAME_Q) == NAME_A
    killed = re.findall(r"\(pid (\d+)\) made no progress", d.log())
    assert killed == [str(victim)], f"healthy workers killed too: {killed}"


def test_busy_workers_are_not_taken_for_hung(start_daemon, loadgen):
    """worker_timeout = 1 is a valid setting: workers answering thousands of questions a
    second are making progress and must not be killed as hung.  (At a time factor above 1
    worker_timeout is scaled(1 s): the slow machine's scheduling delays are not the worker's.)

    Besides the outcome (no kill, no error), the heartbeats the master judges by are
    sampled from the scoreboard: a healthy worker must refresh its heartbeat more often
    than every worker_timeout, or any scheduling delay gets it killed.
    """
    timeout = scaled(1.0)
    d = start_daemon(config=config(workers=2, lifecycle=f"worker_timeout = {timeout}"))
    pool = wait_pool(d.proc.pid, 2, generation=1)
    board = Scoreboard.open(str(d.pid_file) + ".scoreboard")
    beats: dict[int, list[float]] = {pid: [] for pid in pool}
    with load(loadgen, d.port, conns=200, seconds=3.0, threads=2) as result:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            for _, slot in board.slots():
                seen = beats.get(slot.pid)
                if seen is not None and (not seen or seen[-1] != slot.heartbeat):
                    seen.append(slot.heartbeat)
            time.sleep(0.005)  # the sampling period
    board.close()
    killed = re.findall(r".* made no progress .*", d.log())
    assert killed == [], killed
    assert_no_errors(result)
    assert workers_of(d.proc.pid) == pool
    gaps = {pid: max(b - a for a, b in zip(seen, seen[1:], strict=False)) for pid, seen in beats.items()
            if len(seen) > 1}
    assert len(gaps) == 2, beats
    assert max(gaps.values()) < timeout, (
        f"heartbeats of busy workers are {max(gaps.values()):.3f}s apart, not less than "
        f"worker_timeout = {timeout}s: a healthy worker is killed whenever the master looks "
        f"just before its next heartbeat")


def test_master_never_reads_a_torn_heartbeat():
    """The master judges workers by their scoreboard slots while the workers rewrite them.

    A worker's slot is only ever rewritten with state "serving" and a fresh heartbeat, so a
    concurrent reader must never see it "free" with heartbeat 0: the master would take that
    worker for hung since boot (age = the whole monotonic clock) and SIGKILL it, whatever
    worker_timeout is.  Seen in the HUP storm as
    "worker 2 (pid N) made no progress for 1209s (free): killing it".
    A writer process and this reader hammer one slot for up to a second.
    """
    board = Scoreboard.create(None)  # anonymous shared mapping, shared with the fork below
    board.write_slot(7, Slot(pid=1, number=1, generation=1, state=SERVING, started=time.time(),
                             heartbeat=time.monotonic(), counters=Counters()))
    stop_at = time.monotonic() + 1.0
    pid = os.fork()
    if pid == 0:  # the writer: a worker publishing as fast as it can
        try:
            count = 0
            while (now := time.monotonic()) < stop_at:
                count += 1
                board.write_slot(7, Slot(pid=os.getpid(), number=1, generation=1, state=SERVING, started=1.0,
                                         heartbeat=now, connections=3, counters=Counters(answered=count)))
        finally:
            os._exit(0)
    torn = []
    reads = 0
    try:
        while time.monotonic() < stop_at and not torn:
            slot = board.read_slot(7)
            reads += 1
            if slot.state != SERVING or slot.heartbeat == 0.0:
                torn.append(slot)
    finally:
        os.waitpid(pid, 0)
        board.close()
    assert torn == [], f"torn read after {reads} reads: {torn[0]}"
    assert reads > 1000


def test_max_requests_recycles_the_worker(start_daemon):
    d = start_daemon(config=config(workers=1, lifecycle="max_requests = 50"))
    (first,) = wait_pool(d.proc.pid, 1, generation=1)
    with d.connect() as holder:
        assert ask_on(holder, NAME_Q) == NAME_A
        asked = 0

        def recycled() -> bool:
            nonlocal asked
            assert d.ask(NAME_Q) == NAME_A  # a refused connection fails the test here
            asked += 1
            pool = workers_of(d.proc.pid)
            return asked > 50 and "recycled after max_requests" in d.log() and bool(set(pool) - {first})
        wait_for(recycled, 15, "the worker recycled and replaced")
        wait_log(d.log_file, rf"worker 1 \(pid {first}\) recycled after max_requests")
        wait_log(d.log_file, rf"\[{first}\] worker 1: served 50 questions \(max_requests\): retiring")
        # Its own open connection is still answered (by it draining, or by the worker it was
        # handed to) while the new worker serves the rest.
        assert ask_on(holder, NAME_Q) == NAME_A
        assert d.ask(NAME_Q) == NAME_A
    wait_for(lambda: gone(first), 5, "the recycled worker to exit (its client has left)")
    assert first not in wait_pool(d.proc.pid, 1, generation=1)


# =================================================================================
# 9. Signal bursts; TERM at any moment
# =================================================================================

def test_signal_burst_then_term(start_daemon):
    d = start_daemon(config=config(workers=2, graceful_timeout=scaled(5)))  # drained before it, not killed
    master = d.proc.pid
    wait_pool(master, 2, generation=1)
    with Asker(d.port) as asker:
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGHUP, signal.SIGTTOU, signal.SIGHUP,
                    signal.SIGTTIN, signal.SIGHUP):
            os.kill(master, sig)
        generation = settled(d, 2)
    assert not asker.bad(), asker.outcomes
    assert asker.ok > 0
    assert generation >= 2
    board = Scoreboard.open(str(d.pid_file) + ".scoreboard")
    header = board.read_header()
    board.close()
    assert (header.generation, header.workers_target) == (generation, 2)
    wait_pool(master, 2, generation=generation)

    def no_zombie() -> bool:
        live = live_children(master)
        return live is not None and len(live) == len(psutil.Process(master).children())
    wait_for(no_zombie, 3, "no zombie child")
    members = {p.pid for p in group_members(master)}
    children = {c.pid for c in psutil.Process(master).children()}
    assert members == {master} | children, describe(group_members(master))
    assert_clean_log(d.log())

    d.signal(signal.SIGTERM)
    assert d.wait_exit(5) == 0
    assert_nothing_left(master)
    assert not d.pid_file.exists()


def test_term_during_reload(start_daemon):
    d = start_daemon(config=config(workers=2, graceful_timeout=scaled(5)))  # drained before it, not killed
    wait_pool(d.proc.pid, 2, generation=1)
    d.signal(signal.SIGHUP)
    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    assert_nothing_left(d.proc.pid)
    assert not d.pid_file.exists()
    assert "master stopped" in d.log()


def test_a_stop_during_an_upgrade_starts_no_queued_reload(start_daemon):
    """USR2, then HUP (queued behind the upgrade), then TERM: the upgrade is abandoned and the
    master stops; the queued reload must not start on the way out.  The successor's worker boots
    for scaled(3) s: HUP and TERM must come before it is ready, on a slow machine too."""
    boot = scaled(3)
    d = start_daemon(config=config(workers=1), env={"LANCELOTD_TEST_BOOT_DELAY": f"{boot}@1:1"}, wait=False)
    d.wait_ready(timeout=15, workers=1)
    d.signal(signal.SIGUSR2)  # the successor's worker sleeps `boot` s in its boot
    wait_log(d.log_file, r"upgrade: new master (\d+) started")
    d.signal(signal.SIGHUP)
    wait_log(d.log_file, r"reload requested while one is under way: queued")
    d.signal(signal.SIGTERM)
    assert d.wait_exit(15) == 0
    log = read(d.log_file)
    after_term = log[log.index("graceful stop"):]
    assert "reloading" not in after_term and "reload" not in after_term.replace("reload requested", ""), \
        after_term
    assert "upgrade failed: stopping" in log


def test_usr2_is_refused_in_a_master_that_is_pid_1(tmp_path):
    """In a container without an init, the master is PID 1: a successor would die with it (the
    namespace ends with its PID 1), so USR2 is refused with a clear line and nothing changes."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a PID namespace")
    # Whether the namespace can be made is asked first, of unshare alone: once lancelotd runs
    # in it, its exit is a failure of lancelotd (with its log), never a skip.
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                           text=True, timeout=scaled(30), stdin=subprocess.DEVNULL)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.strip()}")
    log = tmp_path / "lancelotd.log"
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "lancelotd", "serve",
           "-b", "127.0.0.1:0", "-w", "1", "--pid-file", str(tmp_path / "lancelotd.pid"),
           "--log-file", str(log)]
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=clean_env())
    try:
        def master() -> psutil.Process | None:
            if proc.poll() is not None:
                raise AssertionError(f"lancelotd exited with {proc.returncode} as PID 1 of its namespace:\n"
                                     f"{read(tmp_path / 'stderr')}{read(log)}")
            children = psutil.Process(proc.pid).children()
            return children[0] if children and "ready" in read(log) else None
        pid1 = wait_for(master, 15, "the master, PID 1 of its namespace")
        assert read_pid(tmp_path / "lancelotd.pid") == 1
        pid1.send_signal(signal.SIGUSR2)
        wait_log(log, r"USR2 refused: this master is PID 1")
        assert "upgrade: starting" not in read(log)
        pid1.send_signal(signal.SIGTERM)
        assert proc.wait(scaled(15)) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(scaled(10))
