"""The scoreboard under faults: a full /run, torn reads, an old layout, a foreign board.

Concurrency tests race a real writer process (fork) against a reader in this
process on one shared mapping, for about a second; they assert what a reader
must never see.  The full-filesystem tests mount a small tmpfs in a private
mount namespace (unshare), so nothing outside the test sees it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import lancelotd_cli, scaled, status_json, wait_for

from lancelotd import handoff
from lancelotd.scoreboard import (
    SERVING,
    STARTING,
    Counters,
    Header,
    Scoreboard,
    Slot,
    last_progress,
)
from lancelotd.scoreboard import path_for as scoreboard_path

RACE_SECONDS = 1.0


def race(write: Callable[[float], None], read: Callable[[], None]) -> int:
    """Run write(now) in a forked process and read() here until RACE_SECONDS pass; reads done."""
    stop_at = time.monotonic() + RACE_SECONDS
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            while (now := time.monotonic()) < stop_at:
                write(now)
            code = 0
        finally:
            os._exit(code)
    reads = 0
    try:
        while time.monotonic() < stop_at:
            read()
            reads += 1
    finally:
        os.kill(pid, signal.SIGKILL)  # a failed read must not leave the writer running
        os.waitpid(pid, 0)
    return reads


# --- 1. the file is allocated at creation --------------------------------------------------

def small_tmpfs(directory: Path, argv: list[str], size: str = "16k") -> list[str]:
    """`argv` run in a private mount namespace where `directory` is a tmpfs of `size`."""
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-Urm"]
    # mode=0755: a tmpfs is 1777 by default, which the runtime directory rules refuse.
    script = 'mount -t tmpfs -o size="$0",mode=0755 tmpfs "$1" && shift && exec "$@"'
    return [*unshare, "sh", "-c", script, size, str(directory), *argv]


def need_small_tmpfs(directory: Path) -> None:
    try:
        probe = subprocess.run(small_tmpfs(directory, ["true"]), capture_output=True, text=True,
                               timeout=scaled(10))
    except FileNotFoundError:
        pytest.skip("no unshare(1): cannot mount a small tmpfs for the test")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")


def test_create_on_a_full_filesystem_fails_at_once_and_leaves_nothing(tmp_path):
    """Before: ftruncate made a sparse file, which succeeds on a full tmpfs; the first touch of an
    unbacked page was a SIGBUS, in the master or a worker, whenever that slot was first used."""
    run = tmp_path / "run"
    run.mkdir()
    need_small_tmpfs(run)
    script = ("import errno, os, sys\n"
              "from lancelotd.scoreboard import Scoreboard\n"
              "try:\n"
              "    Scoreboard.create(sys.argv[1] + '/lancelotd.pid.scoreboard')\n"
              "except OSError as e:\n"
              "    print(errno.errorcode[e.errno], os.listdir(sys.argv[1]))\n"
              "else:\n"
              "    print('created', os.listdir(sys.argv[1]))\n")
    result = subprocess.run(small_tmpfs(run, [sys.executable, "-c", script, str(run)]),
                            capture_output=True, text=True, timeout=scaled(30))
    assert result.stdout.strip() == "ENOSPC []", result.stdout + result.stderr


def test_a_full_run_directory_refuses_start(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: in the user namespace a user's unshare makes, the host's root-owned "
                    "directories show as uid 65534, which the runtime directory rules refuse; the "
                    "allocation itself is tested by the test above")
    run = tmp_path / "run"
    run.mkdir()
    need_small_tmpfs(run)
    log = tmp_path / "lancelotd.log"
    env = {k: v for k, v in os.environ.items() if k != "LANCELOTD_CONFIG"}
    argv = [sys.executable, "-m", "lancelotd", "serve", "--pid-file", str(run / "lancelotd.pid"),
            "-b", "127.0.0.1:0", "-w", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(small_tmpfs(run, argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env=env)
    try:
        try:
            code = proc.wait(timeout=scaled(20))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lancelotd started on a full /run:\n{log.read_text()}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    text = log.read_text()
    assert code == 1, f"exit status {code}:\n{text}"
    assert "No space left on device" in text and "Traceback" not in text, text


# --- 2. a new worker is never read as SERVING with heartbeat 0 ------------------------------

def test_a_new_worker_is_never_read_serving_with_heartbeat_0():
    """Seen as "worker 2 (pid 2285) made no progress for 115s (serving): killing it" just after
    start: the worker's first write stored state=SERVING before heartbeat=now, over the slot the
    master had written as STARTING with heartbeat 0, and the master read it in between.  The
    writer here plays the slot's whole life as fast as it can: cleared, STARTING (the master's
    write before fork), SERVING (the worker's first tick)."""
    board = Scoreboard.create(None)
    seen = {"serving": 0}
    torn: list[Slot] = []

    def write(now: float) -> None:
        board.clear_slot(7)
        board.write_slot(7, Slot(state=STARTING, number=2, generation=1))
        board.write_slot(7, Slot(os.getpid(), 2, 1, SERVING, time.time(), now, 0, 0.0, Counters()))

    def read() -> None:
        slot = board.read_slot(7)
        if slot.state == SERVING:
            seen["serving"] += 1
            if slot.heartbeat == 0.0 or slot.pid == 0:
                torn.append(slot)
                raise AssertionError(f"read as serving with heartbeat 0: {slot}")

    try:
        reads = race(write, read)
    finally:
        board.close()
    assert torn == [] and reads > 1000 and seen["serving"] > 100, (reads, seen)


def test_the_master_judges_a_missing_heartbeat_by_the_spawn_time():
    """Even a torn read (possible on CPUs that reorder stores) must not make a worker look hung."""
    spawned = 1000.0
    assert last_progress(Slot(state=SERVING, heartbeat=0.0), spawned) == spawned
    assert last_progress(Slot(state=STARTING, heartbeat=0.0), spawned) == spawned
    assert last_progress(Slot(state=SERVING, heartbeat=1005.0), spawned) == 1005.0
    assert last_progress(Slot(state=SERVING, heartbeat=999.9), spawned) == spawned  # a previous tenant's


# --- 3. the reload result is published as one record -----------------------------------------

def reload_message(reloads: int, ok: bool) -> str:
    return f"reload {reloads} {'done: generation ' + str(reloads) if ok else 'REFUSED: bad config'}"


@pytest.mark.parametrize("style", ["publish", "write_message then write_header"])
def test_reload_result_is_never_read_half_published(style):
    """`lancelotd reload` waits for reloads > before and reload_pending = 0, then reports
    last_reload_ok and the message: a refused reload must never read as done, nor with the
    previous reload's message.  The writer alternates refused and done reloads; every snapshot
    the reader takes must agree with itself.  The second style is the call sequence the master
    used before publish() existed: the message waits for the header and goes out with it."""
    board = Scoreboard.create(None)
    header = Header(master_pid=os.getpid(), retired=Counters())
    counted = {"ok": 0, "refused": 0}

    def write(now: float) -> None:
        header.reloads += 1
        ok = header.reloads % 2 == 0
        header.reload_failures += 0 if ok else 1
        header.last_reload_ok = int(ok)
        header.last_reload = now
        header.reload_pending = 0
        message = reload_message(header.reloads, ok)
        if style == "publish":
            board.publish(header, message)
        else:
            board.write_message(message)
            board.write_header(header)
        header.reload_pending = 1  # the next one under way, as the master shows it
        board.publish(header)

    def read() -> None:
        h, message = board.read_reload_result()
        if h.reloads == 0:
            return
        ok = h.reloads % 2 == 0
        assert (bool(h.last_reload_ok), message, h.reload_failures) == (
            ok, reload_message(h.reloads, ok), (h.reloads + 1) // 2), f"inconsistent: {h} {message!r}"
        counted["ok" if ok else "refused"] += 1

    try:
        reads = race(write, read)
    finally:
        board.close()
    assert reads > 1000 and counted["ok"] > 10 and counted["refused"] > 10, (reads, counted)


def config_text(color: str) -> str:
    return f'[answers]\n"What is your favorite color?" = "{color}"\n'


def test_a_refused_reload_is_reported_as_failed(start_daemon):
    d = start_daemon(config=config_text("Blue."), workers=1)
    d.config_file.write_text(config_text("Green."))
    done = lancelotd_cli("reload", "--pid-file", str(d.pid_file))
    assert done.returncode == 0 and "reloaded: generation 2 serving" in done.stdout, done.stdout + done.stderr
    d.config_file.write_text(config_text("Red.") + "[server]\nworkers = \"many\"\n")
    refused = lancelotd_cli("reload", "--pid-file", str(d.pid_file))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "reload failed" in refused.stderr and "server.workers" in refused.stderr, refused.stderr
    assert "reloaded" not in refused.stdout, refused.stdout
    snap = status_json(d.pid_file)
    reloads = snap["reloads"]
    assert (reloads["count"], reloads["failures"], reloads["last_ok"]) == (2, 1, False), reloads
    assert "server.workers" in snap["reloads"]["last_message"], snap["reloads"]
    assert d.ask("What is your favorite color?") == b"Green."


# --- 4. readers check the layout version ------------------------------------------------------

def old_layout(path: Path) -> None:
    """Make `path` look like a scoreboard of lancelotd's first layout."""
    with open(path, "r+b") as f:
        f.write(b"LNCLTSB1")


def test_open_refuses_another_layout(tmp_path):
    path = tmp_path / "lancelotd.pid.scoreboard"
    Scoreboard.create(str(path)).close()
    Scoreboard.open(str(path)).close()
    old_layout(path)
    with pytest.raises(ValueError, match=r"scoreboard layout version 1, this lancelotd reads \d+: "
                                         r"run the lancelotd that started the master"):
        Scoreboard.open(str(path))
    path.write_bytes(b"not a scoreboard at all")
    with pytest.raises(ValueError, match="not a lancelotd scoreboard"):
        Scoreboard.open(str(path))


def test_a_retiring_worker_hands_nothing_to_a_board_it_cannot_read(tmp_path):
    """After a USR2, a worker of one version reads the scoreboard of a master of another: it must
    not take another layout's bytes for targets (here: a "serving" worker that does not exist)."""
    own = Scoreboard.create(None)
    own.write_header(Header(master_pid=os.getpid(), generation=1, retired=Counters()))
    own.write_slot(0, Slot(4242, 1, 1, SERVING, time.time(), time.monotonic(), 0, 0.0, Counters()))
    path = tmp_path / "lancelotd.pid.scoreboard"
    foreign = Scoreboard.create(str(path))
    foreign.write_header(Header(master_pid=1, generation=1, retired=Counters()))
    foreign.write_slot(0, Slot(4343, 1, 1, SERVING, time.time(), time.monotonic(), 0, 0.0, Counters()))
    foreign.close()
    host = SimpleNamespace(epoll=select.epoll())  # the hand-off's view of its worker: only what targets needs
    sender = handoff.HandOff(host, str(tmp_path / "lancelotd.pid"), str(path), own, 100)
    try:
        assert [pid for pid, _ in sender._targets(time.monotonic())] == [4343]  # same layout: the new board
        old_layout(path)
        assert [pid for pid, _ in sender._targets(time.monotonic())] == [4242]  # another: never its bytes
    finally:
        host.epoll.close()
        own.close()


# --- 5. status checks that the scoreboard is the PID file's master's ----------------------------

@pytest.mark.parametrize("leftover", ["a dead master's", "another layout's"])
def test_status_refuses_a_scoreboard_that_is_not_the_masters(start_daemon, leftover):
    """Say a USR2 successor created its scoreboard (over the master's, beside the same PID file)
    and died before writing its PID file: the PID file names the old master, alive, but the
    scoreboard beside it is the dead one's.  `status` must not show it as the master's."""
    d = start_daemon(config=config_text("Blue."), workers=1)
    assert lancelotd_cli("status", "--pid-file", str(d.pid_file)).returncode == 0
    board_file = scoreboard_path(str(d.pid_file))
    successor = subprocess.run(
        [sys.executable, "-c", "import sys; from lancelotd.scoreboard import Scoreboard\n"
                               "Scoreboard.create(sys.argv[1]); print(__import__('os').getpid())",
         board_file], capture_output=True, text=True, timeout=scaled(30), check=True)
    dead = int(successor.stdout)
    if leftover == "another layout's":
        old_layout(Path(board_file))
    result = lancelotd_cli("status", "--pid-file", str(d.pid_file))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    if leftover == "a dead master's":
        assert f"master {dead}" in result.stderr and str(d.proc.pid) in result.stderr, result.stderr
    else:
        assert "layout version 1" in result.stderr, result.stderr
    snap = json.loads(lancelotd_cli("status", "--pid-file", str(d.pid_file), "--json").stdout)  # exits 4 too
    assert snap["state"] == "unknown" and "scoreboard" in snap["problem"], snap
    reload = lancelotd_cli("reload", "--pid-file", str(d.pid_file))
    assert reload.returncode == 4, reload.stdout + reload.stderr  # never waits on a board nobody writes
    wait_for(lambda: d.proc.poll() is None, 1, "the master still running")


def test_the_creator_is_the_master_from_the_start(tmp_path):
    """A PID file may be read before the master's first publish: the board names it already."""
    board = Scoreboard.create(str(tmp_path / "x.scoreboard"))
    try:
        assert board.read_header().master_pid == os.getpid()
    finally:
        board.close()


def test_a_scrape_adds_up_when_a_worker_publishes_during_it():
    """Seen in a default run: total answered 40, the two workers' series 0 and 0 in the same
    scrape.  The collector read the slots, then totals() read them again, and a worker's tick
    in between reached only the second reading.  Here the tick lands right after the first."""
    from lancelotd.metrics import ScoreboardCollector

    board = Scoreboard.create(None)
    now = time.monotonic()
    board.write_slot(0, Slot(os.getpid(), 1, 1, SERVING, time.time(), now, 0, 0.0, Counters()))

    class TickDuringScrape:
        """The board, but worker 1 publishes 40 answers as soon as its slots were read once."""
        ticked = False

        def __getattr__(self, name: str) -> object:
            return getattr(board, name)

        def slots(self):  # noqa: ANN202
            yield from board.slots()
            if not self.ticked:
                self.ticked = True
                board.write_slot(0, Slot(os.getpid(), 1, 1, SERVING, time.time(), now, 0, 0.0,
                                         Counters(answered=40)))

    try:
        families = {f.name: f for f in ScoreboardCollector(TickDuringScrape(), board.read_header,
                                                           os.getpid()).collect()}
    finally:
        board.close()
    per_worker = sum(s.value for s in families["lancelotd_worker_questions_answered"].samples
                     if s.name.endswith("_total"))
    total = sum(s.value for s in families["lancelotd_questions_answered"].samples
                if s.name.endswith("_total"))
    assert per_worker == total, (per_worker, total)
