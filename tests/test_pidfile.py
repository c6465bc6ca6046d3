"""The PID file's staleness rule (issue 9, item 7): clock steps, reused PIDs, the USR2 window.

A wall-clock step cannot be made on a shared machine; what a step does to
the PID file is move its mtime relative to the clock the rule reads, so the
tests move the mtime instead (os.utime): an hour in the past is the clock
stepped forward an hour after the master started (NTP at boot, VM resume).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import Daemon, lancelotd_cli, wait_for

from lancelotd import pidfile


@pytest.mark.parametrize("step", [3600.0, -3600.0, 86400.0 * 365])
def test_a_clock_step_does_not_make_a_live_master_stale(start_daemon, step: float) -> None:
    d: Daemon = start_daemon(workers=1)
    written = time.time() - step
    os.utime(d.pid_file, (written, written))

    status = lancelotd_cli("status", "--pid-file", str(d.pid_file))
    assert status.returncode == 0, status.stdout + status.stderr

    second = start_daemon(wait=False, subdir=d.tmp.name)  # the same PID file
    assert second.wait_exit(15) == 1, second.log()
    assert f"already running as PID {d.proc.pid}" in second.log()
    assert d.pid_file.read_text() == f"{d.proc.pid}\n"
    assert d.proc.poll() is None


def test_the_pid_file_holds_the_pid_alone(start_daemon) -> None:
    """`kill $(cat FILE)` and systemd's PIDFile= read it as they are."""
    d: Daemon = start_daemon(workers=1)
    assert d.pid_file.read_text() == f"{d.proc.pid}\n"


def test_a_reused_pid_is_stale_even_when_it_is_a_lancelotd_master(start_daemon, tmp_path: Path) -> None:
    """A file naming a live master whose start record is not that master's: the PID was reused."""
    d: Daemon = start_daemon(workers=1)
    other = tmp_path / "other"
    other.mkdir()
    pid_file = other / "lancelotd.pid"
    pid_file.write_text(f"{d.proc.pid}\n")
    record = Path(pidfile.record_path(str(pid_file), d.proc.pid))
    pid, boot_id, started = (pidfile.identity(d.proc.pid) or "").split()
    record.write_text(f"{pid} {boot_id} {int(started) - 1}\n")  # started one tick before this one

    status = lancelotd_cli("status", "--pid-file", str(pid_file))
    assert status.returncode == 1, status.stdout + status.stderr  # LSB: dead, PID file exists

    pid_file.write_text(f"{d.proc.pid}\n")
    record.unlink()  # no record (a master of an older version): its title decides, and it is a master
    found = pidfile.master_process(str(pid_file))
    assert found is not None and found.pid == d.proc.pid


@pytest.mark.parametrize("pid_file_state", ["absent", "stale"])
def test_stop_during_an_upgrade_window_stops_the_old_master(start_daemon, pid_file_state: str) -> None:
    """USR2 renames PIDFILE to PIDFILE.oldbin before the new master writes PIDFILE."""
    d: Daemon = start_daemon(workers=1)
    workers = d.workers()
    os.replace(d.pid_file, f"{d.pid_file}.oldbin")  # what the master does on USR2
    if pid_file_state == "stale":
        d.pid_file.write_text(f"{dead_pid()}\n")

    stop = lancelotd_cli("stop", "--pid-file", str(d.pid_file), timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert f"stopped master {d.proc.pid}" in stop.stdout
    assert d.wait_exit(15) == 0
    wait_for(lambda: not any(map(alive, workers)), 10, "the workers to exit")


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def dead_pid() -> int:
    """A PID that names no process now."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
