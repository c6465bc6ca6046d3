"""The failure matrix of a USR2 upgrade (and of a HUP reload): every way it can fail leaves the
service exactly as it was (README, "Upgrading the binary"; docs/DESIGN.md, "Failure matrix").

Each case starts a real daemon (2 workers), opens connections before the upgrade and keeps
opening them during it, makes the upgrade fail one way, and then checks the same things:

- a new connection is answered within 1 s of the rollback, and still once a stop begun by mistake
  would have ended (STILL_SERVING_AFTER: graceful_timeout plus the drain grace, and a second);
- every connection opened across the upgrade, those accepted during it included, is still
  answered: none was closed (a closed one fails its next question);
- `lancelotd status` exits 0, and one master is left, the old one, with the same workers;
- the PID file, the start record and the public scoreboard are the old master's;
- no `.new-*`, `.oldbin`, stray start record, temporary file or foreign inbox is left.

The faults are injected where a real one would strike (LANCELOTD_TEST_UPGRADE_FAULT in
upgrade.py, the boot faults of worker.py made conditional on a file the test touches once the
old master serves, so only the successor's workers are hit).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import (
    NAME_A,
    NAME_Q,
    ask,
    ask_on,
    lancelotd_cli,
    read_pid,
    scaled,
    title,
    wait_child_exit,
    wait_for,
    wait_log,
    wait_pool,
)

from lancelotd import pidfile
from lancelotd.scoreboard import Scoreboard
from lancelotd.scoreboard import path_for as scoreboard_path
from lancelotd.upgrade import DRAIN_GRACE

GRACEFUL = 1  # graceful_timeout, short so that STILL_SERVING_AFTER can be
CONFIG = f"""
[server]
workers = 2
[lifecycle]
graceful_timeout = {GRACEFUL}
"""
# LANCELOTD_TEST_UPGRADE_TIMEOUT: the daemon's 30 s, shortened for the tests and scaled, so that a slow
# machine's successor is not abandoned for being slow; the faults that outlast it are scaled with it.
UPGRADE_BASE = 4
UPGRADE_TIMEOUT = scaled(UPGRADE_BASE)
# The matrix's "and still serving later": longer than a stop the old master began by mistake takes
# to show (its workers drain for graceful_timeout, then the master waits up to DRAIN_GRACE more
# before it kills them), with a second to spare.  Behaviour, not patience: not scaled.
STILL_SERVING_AFTER = GRACEFUL + DRAIN_GRACE + 1.0


class Clients:
    """Connections held across the upgrade: some opened before, a stream opened during it.

    The opener thread records every failure, whatever its kind: a connection reset, closed
    (EOFError) or a wrong answer all fail the test.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: list[socket.socket] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._open_during, daemon=True)

    def open(self, count: int) -> None:
        for _ in range(count):
            self._open_one()

    def _open_one(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=scaled(5))
        self.conns.append(sock)
        answer = ask_on(sock, NAME_Q)
        if answer != NAME_A:
            raise AssertionError(f"answer {answer!r}")

    def _open_during(self) -> None:
        while not self.stop.wait(0.025):  # unscaled: the period of new connections
            try:
                self._open_one()
            except BaseException as e:  # noqa: BLE001 - every kind of failure counts
                self.failures.append(f"opening a connection during the upgrade: {e!r}")

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(scaled(10))
        assert not self.thread.is_alive()

    def check_all(self) -> None:
        """Every connection still answers on the same socket."""
        for i, sock in enumerate(self.conns):
            try:
                answer = ask_on(sock, NAME_Q)
            except BaseException as e:  # noqa: BLE001
                self.failures.append(f"connection {i} of {len(self.conns)}: {e!r}")
                continue
            if answer != NAME_A:
                self.failures.append(f"connection {i}: answer {answer!r}")
        assert not self.failures, "\n".join(self.failures[:20]) + f"\n({len(self.failures)} failures)"

    def close(self) -> None:
        for sock in self.conns:
            sock.close()


def masters_in_group(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and title(proc).startswith("lancelotd: master") \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            pass
    return found


def group_pids(pgid: int) -> set[int]:
    pids = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                pids.add(proc.pid)
        except (OSError, psutil.Error):
            pass
    return pids


def assert_files_are_the_old_masters(d, old: int, workers: set[int]) -> None:
    pid_file = str(d.pid_file)
    assert read_pid(d.pid_file) == old
    assert pidfile.recorded_identity(pid_file, old, os.getuid()) == pidfile.identity(old)
    board = Scoreboard.open(scoreboard_path(pid_file))
    try:
        assert board.read_header().master_pid == old
    finally:
        board.close()
    left = sorted(p.name for p in d.tmp.iterdir())
    leftovers = [name for name in left
                 if ".new-" in name or ".oldbin" in name or name.endswith(".tmp")
                 or (name.startswith("lancelotd-master-") and name != f"lancelotd-master-{old}.start")
                 or (".handoff-" in name and int(name.rpartition("-")[2]) not in workers)]
    assert not leftovers, left


def successor_of(d) -> int | None:
    match = re.search(r"upgrade: new master (\d+) started", d.log())
    return int(match.group(1)) if match else None


def assert_as_before(d, clients: Clients, old: int, workers: dict[int, tuple[int, int]],
                     failed_at: float) -> None:
    """The checks of the matrix, once the rollback was logged at `failed_at` (monotonic)."""
    assert ask(d.port) == NAME_A
    assert time.monotonic() - failed_at < scaled(1.0), "no answer within 1 s of the rollback"
    clients.finish()
    clients.check_all()
    successor = successor_of(d)
    if successor:
        wait_child_exit(successor, 15)  # an orphan at birth: ours (the subreaper's) to reap
    wait_for(lambda: group_pids(old) == {old, *workers}, 15, "only the old master and its workers")
    time.sleep(STILL_SERVING_AFTER)
    assert ask(d.port) == NAME_A
    clients.check_all()
    assert [p.pid for p in masters_in_group(old)] == [old]
    assert wait_pool(old, 2, generation=1) == workers
    status = lancelotd_cli("status", "--pid-file", str(d.pid_file))
    assert status.returncode == 0, status.stdout + status.stderr
    assert str(old) in status.stdout
    assert_files_are_the_old_masters(d, old, set(workers))
    assert "Traceback" not in d.log(), d.log()


# (fault environment, what the old master logs) for each way a USR2 upgrade can fail.
# TRIGGER in a value is replaced by the file the test touches once the old master serves.
CASES = {
    "exec-fails": ({"LANCELOTD_TEST_UPGRADE_FAULT": "exec"}, r"cannot start"),
    "workers-never-boot": ({"LANCELOTD_TEST_FAIL_BOOT_IF": "TRIGGER"}, r"workers cannot boot"),
    "worker-2-fails-at-boot": ({"LANCELOTD_TEST_FAIL_BOOT": "1:2", "LANCELOTD_TEST_FAIL_BOOT_IF": "TRIGGER"},
                               r"workers cannot boot"),
    "not-ready-in-time": ({"LANCELOTD_TEST_BOOT_DELAY": f"{scaled(30)}@1:2",
                           "LANCELOTD_TEST_BOOT_DELAY_IF": "TRIGGER"},
                          r"not ready within"),
    "dies-before-the-files": ({"LANCELOTD_TEST_UPGRADE_FAULT": "before-files"}, r"exited before|went away"),
    "cannot-take-the-files": ({"LANCELOTD_TEST_UPGRADE_FAULT": "files-error"}, r"cannot take the PID file"),
    "dies-after-taking-the-files": ({"LANCELOTD_TEST_UPGRADE_FAULT": "after-go"}, r"exited before|went away"),
    "dies-right-after-done": ({"LANCELOTD_TEST_UPGRADE_FAULT": "after-done"}, r"died right after"),
    "abandoned-between-go-and-done": ({"LANCELOTD_TEST_UPGRADE_FAULT": "slow-go",
                                       "LANCELOTD_TEST_SLOW_GO": str(UPGRADE_TIMEOUT + scaled(3))},
                                      r"not ready within"),
}


def start(start_daemon, tmp_path: Path, env: dict[str, str]):
    trigger = tmp_path / "trigger"
    env = {k: v.replace("TRIGGER", str(trigger)) for k, v in env.items()}
    env["LANCELOTD_TEST_UPGRADE_TIMEOUT"] = str(UPGRADE_TIMEOUT)
    d = start_daemon(config=CONFIG, workers=2, env=env)
    workers = wait_pool(d.proc.pid, 2, generation=1)
    trigger.touch()  # from now on, only a new master's workers boot with the fault
    return d, workers


@pytest.mark.parametrize("case", list(CASES))
def test_a_failed_upgrade_leaves_the_service_as_it_was(start_daemon, tmp_path, case):
    env, reason = CASES[case]
    d, workers = start(start_daemon, tmp_path, env)
    old = d.proc.pid
    clients = Clients(d.port)
    try:
        clients.open(20)
        clients.start()
        d.signal(signal.SIGUSR2)
        line = wait_log(d.log_file, r"upgrade failed: .*", timeout=UPGRADE_BASE + 20)[0].group(0)
        failed_at = time.monotonic()
        assert re.search(reason, line), line
        assert "keeps serving" in line
        assert_as_before(d, clients, old, workers, failed_at)
    finally:
        clients.close()


def test_a_failed_reload_leaves_the_service_as_it_was(start_daemon, tmp_path):
    """The same checks for a HUP whose new generation cannot boot."""
    d, workers = start(start_daemon, tmp_path, {"LANCELOTD_TEST_FAIL_BOOT": "2"})
    old = d.proc.pid
    clients = Clients(d.port)
    try:
        clients.open(20)
        clients.start()
        d.signal(signal.SIGHUP)
        wait_log(d.log_file, r"reload failed: .*", timeout=20)
        assert_as_before(d, clients, old, workers, time.monotonic())
    finally:
        clients.close()


def test_a_term_to_the_old_master_between_go_and_done_stops_both_cleanly(start_daemon, tmp_path):
    """The operator stops the service in the middle of an upgrade: the old master abandons the new
    one (SIGKILL: it may be taking the files), stops as a TERM says, and nothing is left."""
    d, workers = start(start_daemon, tmp_path, {"LANCELOTD_TEST_UPGRADE_FAULT": "slow-go",
                                                "LANCELOTD_TEST_SLOW_GO": "3"})
    old = d.proc.pid
    with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(5)) as held:
        assert ask_on(held, NAME_Q) == NAME_A
        d.signal(signal.SIGUSR2)
        wait_log(d.log_file, r"upgrade: new master \d+ serves: letting it take over")
        d.signal(signal.SIGTERM)
        assert d.wait_exit(15) == 0
        successor = successor_of(d)
        assert successor is not None
        wait_child_exit(successor, 15)
        wait_for(lambda: not group_pids(old), 15, "every process of the service to exit")
    assert "upgrade failed" in d.log() and "Traceback" not in d.log()
    ours = ("lancelotd.log", "lancelotd.toml", "trigger")
    left = sorted(p.name for p in d.tmp.iterdir() if p.name not in ours)
    assert not left, left
