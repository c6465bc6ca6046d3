"""docs/PROMISES.md §5 without systemd: sd_notify messages, LISTEN_FDS adoption, --daemon.

The test plays systemd's part: its own AF_UNIX datagram socket (a path, or an
abstract "@name") is the daemon's NOTIFY_SOCKET, with SO_PASSCRED so every
message carries its sender's PID as the kernel saw it; a listening socket of
its own goes in as fd 3 with LISTEN_FDS=1 and LISTEN_PID=<the daemon's PID>
(the wrapper below sets the PID variables right before exec, as systemd does).

Every daemon runs in its own session and is killed with its group and reaped
at teardown (conftest's start_daemon, or the `spawn` fixture here).  A master
that outlives its parent (USR2, --daemon) is reparented to the test process,
which is a child subreaper for the whole session (conftest), and reaped too.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import (
    NAME_A,
    NAME_Q,
    Message,
    NotifySocket,
    ask,
    lancelotd_cli,
    listening_ports,
    read_pid,
    scaled,
    status_json,
    wait_child_exit,
    wait_for,
)

STATUS_LINE = re.compile(r"gen (\d+), (\d+) workers, (\d+) questions answered, last reload: (.+)")
LISTEN_VARS = (b"LISTEN_PID=", b"LISTEN_FDS=", b"LISTEN_FDNAMES=")
# WatchdogSec: scaled(1 s), so that on a slow machine the master's pings, due every half of it, still
# come in time; the test's expectations of the pings are in units of it.
WATCHDOG_SEC = scaled(1.0)
WATCHDOG_USEC = str(round(WATCHDOG_SEC * 1_000_000))


# --- the notify socket ---------------------------------------------------------------------


def ready(m: Message) -> bool:
    return m.get("READY") == "1"


@pytest.fixture(params=["path", "abstract"])
def notify_any(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    if request.param == "path":
        sock = NotifySocket(str(tmp_path / "notify.sock"))
    else:
        sock = NotifySocket(f"@lancelotd-test-{os.getpid()}-{secrets.token_hex(4)}")
    yield sock
    sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


# --- processes -------------------------------------------------------------------------------


def environ(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# =================================================================================
# sd_notify
# =================================================================================

def test_ready_with_status_once_serving(start_daemon, notify_any):
    d = start_daemon(workers=2, env={"NOTIFY_SOCKET": notify_any.address}, wait=False)
    message = notify_any.wait(ready, what="READY=1")
    assert message.pid == d.proc.pid
    assert STATUS_LINE.fullmatch(message.get("STATUS") or ""), message.raw
    assert STATUS_LINE.fullmatch(message.get("STATUS")).groups() == ("1", "2", "0", "none")
    d.wait_ready()  # the port, from the log
    assert d.ask(NAME_Q) == NAME_A
    assert all(m.pid == d.proc.pid for m in notify_any.messages), "a message not from the master"
    assert sum(ready(m) for m in notify_any.messages) == 1


def test_hup_sends_reloading_with_monotonic_usec_then_ready(start_daemon, notify):
    d = start_daemon(config="[server]\nworkers = 2\n", env={"NOTIFY_SOCKET": notify.address}, wait=False)
    started = notify.wait(ready, what="READY=1")
    d.wait_ready()

    before = monotonic_usec()
    d.signal(signal.SIGHUP)
    reloading = notify.wait(lambda m: m.get("RELOADING") == "1", what="RELOADING=1", after=started)
    after = monotonic_usec()
    assert reloading.pid == d.proc.pid
    assert before <= int(reloading.get("MONOTONIC_USEC") or 0) <= after, reloading.raw
    done = notify.wait(ready, what="READY=1 after the reload", after=reloading)
    assert not any(ready(m) for m in notify.messages[reloading.seq + 1:done.seq])
    gen, workers, _, last = STATUS_LINE.fullmatch(done.get("STATUS")).groups()
    assert (gen, workers) == ("2", "2") and last.startswith("ok at "), done.raw

    # A refused config: RELOADING=1 too, and READY=1 again (systemd waits for it), saying why.
    d.config_file.write_text("[server]\nworkers = 0\n")
    d.signal(signal.SIGHUP)
    reloading = notify.wait(lambda m: m.get("RELOADING") == "1", what="RELOADING=1", after=done)
    refused = notify.wait(ready, what="READY=1 after the refused reload", after=reloading)
    assert STATUS_LINE.fullmatch(refused.get("STATUS")).group(4).startswith("FAILED at "), refused.raw
    assert "workers" in refused.get("STATUS"), refused.raw
    assert d.ask(NAME_Q) == NAME_A


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGQUIT], ids=["TERM", "QUIT"])
def test_stop_sends_stopping(start_daemon, notify, signum):
    d = start_daemon(workers=2, env={"NOTIFY_SOCKET": notify.address}, wait=False)
    started = notify.wait(ready, what="READY=1")
    d.wait_ready()
    d.signal(signum)
    stopping = notify.wait(lambda m: m.get("STOPPING") == "1", what="STOPPING=1", after=started)
    assert stopping.pid == d.proc.pid
    assert d.wait_exit() == 0
    assert not any(ready(m) for m in notify.messages[stopping.seq:])


def test_watchdog_pings_at_half_the_interval(start_daemon, notify):
    d = start_daemon(workers=1, env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": WATCHDOG_USEC},
                     wait=False)
    started = notify.wait(ready, what="READY=1")
    pings = []
    for _ in range(3):  # Notify.wait scales its timeout as WATCHDOG_SEC is: 1.5 WatchdogSec
        pings.append(notify.wait(lambda m: m.get("WATCHDOG") == "1", timeout=1.5, what="WATCHDOG=1",
                                 after=pings[-1] if pings else started))
    assert all(m.pid == d.proc.pid for m in pings)
    assert pings[1].at - started.at <= 1.5 * WATCHDOG_SEC, "fewer than 2 pings in 1.5 WatchdogSec of READY=1"
    gaps = [b.at - a.at for a, b in zip(pings, pings[1:], strict=False)]
    # Every half WatchdogSec: never as late as WatchdogSec itself, and no flood either.
    assert all(0.3 * WATCHDOG_SEC < gap < WATCHDOG_SEC for gap in gaps), \
        f"gaps between pings {gaps} for WatchdogSec={WATCHDOG_SEC:g}s"


@pytest.mark.parametrize("env", [{"WATCHDOG_USEC": WATCHDOG_USEC, "WATCHDOG_PID": "1"}, {}],
                         ids=["for-another-pid", "not-set"])
def test_no_watchdog_pings_unless_meant_for_us(start_daemon, notify, env):
    start_daemon(workers=1, env={"NOTIFY_SOCKET": notify.address, **env}, wait=False)
    notify.wait(ready, what="READY=1")
    later = notify.collect(1.2 * WATCHDOG_SEC)  # two ping intervals of WatchdogSec
    assert not any(m.get("WATCHDOG") for m in notify.messages + later)


def test_usr2_mainpid_from_the_old_master_and_the_watchdog_moves(spawn, notify):
    # As under systemd: WATCHDOG_PID names the first master.
    d = spawn("-b", "127.0.0.1:0", "-w", "2", own_pid=("WATCHDOG_PID",),
              env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": WATCHDOG_USEC})
    old = d.wait_pid_file()
    d.wait_ready()
    started = notify.wait(lambda m: ready(m) and m.pid == old, what="READY=1")
    notify.wait(lambda m: m.get("WATCHDOG") == "1" and m.pid == old, what="a ping from the master")

    d.signal(signal.SIGUSR2)
    new_ready = notify.wait(lambda m: ready(m) and m.pid != old, what="READY=1 from the new master",
                            after=started)
    new = new_ready.pid
    handover = notify.wait(lambda m: m.get("MAINPID") is not None, what="MAINPID=", after=started)
    assert handover.pid == old and handover.get("MAINPID") == str(new), handover.raw
    # The new master says nothing until the old one has handed it the service.
    assert [m.seq for m in notify.messages if m.pid == new][0] > handover.seq
    assert not any(m.pid == old for m in notify.messages[handover.seq + 1:]), "the old master spoke on"
    assert d.wait_exit(10) == 0  # the old master, its workers had no client
    assert not any(m.get("STOPPING") and m.pid == old for m in notify.messages), \
        "STOPPING=1 from the old master would make systemd stop the service"
    assert read_pid(d.pid_file) == new
    assert ask(d.port) == NAME_A
    # The new master is the main process now: the watchdog is its job.
    last = notify.messages[-1]
    notify.wait(lambda m: m.get("WATCHDOG") == "1" and m.pid == new, timeout=1.5,  # 1.5 WATCHDOG_SEC
                what="a ping from the new master", after=last)
    assert b"WATCHDOG_PID=" not in environ(new)

    os.kill(new, signal.SIGTERM)
    notify.wait(lambda m: m.get("STOPPING") == "1" and m.pid == new, what="STOPPING=1 from the new master")
    assert wait_child_exit(new) == 0


# =================================================================================
# LISTEN_FDS
# =================================================================================

def test_listen_fds_adopted(spawn, notify):
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    # -b names the activated socket's address: it is adopted, not bound again (test_activation.py
    # has the addresses that disagree).
    d = spawn("-b", f"127.0.0.1:{port}", "-w", "2", listen=listener, own_pid=("LISTEN_PID",),
              env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": "lancelotd.socket", "NOTIFY_SOCKET": notify.address})
    listener.close()  # the daemon's now: only it can answer there
    master = d.wait_pid_file()
    notify.wait(ready, what="READY=1")
    assert ask(port) == NAME_A
    log = d.log()
    assert f"listening on 127.0.0.1:{port} (inherited)" in log, log
    assert len(re.findall(r"listening on ", log)) == 1, log
    assert listening_ports(master) == {port}
    workers = d.wait_workers(2)
    for worker in workers:
        assert listening_ports(worker.pid) == {port}

    # The variables are gone from the daemon's environment, so nothing it
    # starts takes the sockets for its own: its USR2 successor (exec'd with
    # that environment) has none, and still serves on the adopted socket.
    d.signal(signal.SIGUSR2)
    new = wait_for(lambda: (pid := read_pid(d.pid_file)) != master and pid, 10, "the new master")
    notify.wait(lambda m: m.get("MAINPID") == str(new), what="MAINPID=")
    assert d.wait_exit(10) == 0
    assert not any(var in environ(new) for var in LISTEN_VARS), environ(new)
    assert ask(port) == NAME_A
    assert listening_ports(new) == {port}
    os.kill(new, signal.SIGTERM)
    assert wait_child_exit(new) == 0
    with pytest.raises(ConnectionRefusedError):
        ask(port)


def test_listen_fds_for_another_pid_are_not_adopted(spawn):
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    d = spawn("-b", "127.0.0.1:0", "-w", "1", listen=listener, env={"LISTEN_FDS": "1", "LISTEN_PID": "1"})
    try:
        d.wait_ready()
    finally:
        listener.close()
    assert d.port != port
    assert "(inherited)" not in d.log()
    assert ask(d.port) == NAME_A


# =================================================================================
# --daemon
# =================================================================================

def launch(tmp: Path, *args: str, pid_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`lancelotd serve --daemon ...`: the launcher, run to completion."""
    pid_file = pid_file or tmp / "lancelotd.pid"
    return lancelotd_cli("serve", "--daemon", "--pid-file", str(pid_file),
                         "--log-file", str(tmp / "lancelotd.log"), *args)


def stop(pid_file: Path) -> subprocess.CompletedProcess[str]:
    return lancelotd_cli("stop", "--pid-file", str(pid_file), "--timeout", "20")


def test_daemon_detaches_once_serving_and_stops(tmp_path):
    pid_file = tmp_path / "lancelotd.pid"
    result = launch(tmp_path, "-b", "127.0.0.1:0", "-w", "2")
    # capture_output: had the daemon kept the launcher's stdout or stderr, run() would still wait.
    assert result.returncode == 0, result.stderr
    # Right away, without waiting: the PID file is there and it answers.
    pid = read_pid(pid_file)
    assert pid is not None, "the launcher returned before the PID file was written"
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)$", (tmp_path / "lancelotd.log").read_text(),
                         re.M).group(1))
    assert ask(port) == NAME_A
    try:
        master = psutil.Process(pid)
        assert master.ppid() == os.getpid()  # an orphan, reparented to us (the subreaper)
        assert os.getsid(pid) not in (os.getsid(0), os.getpid()) and os.getpgid(pid) != os.getpgid(0)
        with open(f"/proc/{pid}/stat") as f:
            tty_nr = int(f.read().rsplit(")", 1)[1].split()[4])
        assert tty_nr == 0, "the daemon has a controlling terminal"
        assert master.cwd() == "/"
        assert all(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null" for fd in (0, 1, 2))
        with open(f"/proc/{pid}/status") as f:
            assert re.search(r"^Umask:\s+0022$", f.read(), re.M)
        assert len(master.children()) == 2

        # A second one with the same PID file is refused, by the launcher.
        again = launch(tmp_path, "-b", "127.0.0.1:0")
        assert again.returncode == 1
        assert f"already running as PID {pid}" in again.stderr, again.stderr

        stopped = stop(pid_file)
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped master {pid}" in stopped.stdout
    finally:
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            os.kill(pid, signal.SIGKILL)
    assert wait_child_exit(pid) == 0
    assert not pid_file.exists()
    with pytest.raises(ConnectionRefusedError):
        ask(port)


def test_daemon_bind_conflict_fails_in_the_launcher(tmp_path):
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    with taken:
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        result = launch(tmp_path, "-b", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"cannot bind 127.0.0.1:{port}" in result.stderr, result.stderr
    assert result.stderr.startswith("lancelotd: "), result.stderr
    assert not (tmp_path / "lancelotd.pid").exists()
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize("fault", ["workers-fail-at-boot", "before-files", "after-go"])
def test_a_failed_upgrade_leaves_the_service_as_it_was(subreaper, spawn, notify, tmp_path, fault):
    """The successor fails at boot, or dies after writing its PID file and scoreboard: it never
    speaks to systemd, and the old master puts its files back and serves on, fully working."""
    broken = tmp_path / "broken-release"
    env = {"NOTIFY_SOCKET": notify.address, "LANCELOTD_TEST_FAIL_BOOT_IF": str(broken)}
    if fault != "workers-fail-at-boot":  # it exits when let in: before or after taking the files
        env["LANCELOTD_TEST_UPGRADE_FAULT"] = fault
    d = spawn("-b", "127.0.0.1:0", "-w", "2", env=env)
    old = d.wait_pid_file()
    d.wait_ready()
    started = notify.wait(lambda m: ready(m) and m.pid == old, what="READY=1")
    if fault == "workers-fail-at-boot":
        broken.touch()  # only workers started from now on fail: the new master's
    d.signal(signal.SIGUSR2)
    failed = notify.wait(lambda m: "upgrade FAILED" in (m.get("STATUS") or ""), what="the failure in STATUS=",
                         after=started)
    assert failed.pid == old
    successor = int(re.search(r"upgrade: new master (\d+) started", d.log()).group(1))
    wait_child_exit(successor)  # gone, and whatever it did on its way out is done (it is ours: subreaper)
    assert all(m.pid == old for m in notify.messages), [(m.pid, m.raw) for m in notify.messages]
    broken.unlink(missing_ok=True)
    assert read_pid(d.pid_file) == old
    assert ask(d.port) == NAME_A
    assert status_json(d.pid_file)["master"]["pid"] == old
    reload = lancelotd_cli("reload", "--pid-file", str(d.pid_file), timeout=60)
    assert reload.returncode == 0, reload.stdout + reload.stderr
    leftovers = sorted(p.name for p in d.pid_file.parent.iterdir() if ".new-" in p.name or "oldbin" in p.name)
    assert leftovers == [], leftovers
    os.kill(old, signal.SIGTERM)
    assert wait_child_exit(old) == 0


def test_term_during_a_reload_is_a_stop_not_a_failed_reload(start_daemon, notify):
    """The new generation is still booting when TERM comes: STOPPING=1, then nothing more; no READY=1
    (which would tell systemd the reload finished) and no "reload failed" in the log.  The boot takes
    scaled(1) s: TERM comes before it ends on a slow machine too."""
    d = start_daemon(config="[server]\nworkers = 2\n", env={"NOTIFY_SOCKET": notify.address,
                                                           "LANCELOTD_TEST_BOOT_DELAY": f"{scaled(1)}"},
                     wait=False)
    started = notify.wait(ready, what="READY=1")
    d.wait_ready()
    d.signal(signal.SIGHUP)
    reloading = notify.wait(lambda m: m.get("RELOADING") == "1", what="RELOADING=1", after=started)
    d.signal(signal.SIGTERM)  # the new workers sleep in their boot for scaled(1) s yet
    stopping = notify.wait(lambda m: m.get("STOPPING") == "1", what="STOPPING=1", after=reloading)
    assert d.wait_exit() == 0
    later = notify.messages[reloading.seq + 1:]
    assert not any(ready(m) for m in later), [m.raw for m in later]
    assert stopping.pid == d.proc.pid
    assert "reload failed" not in d.log() and "reload done" not in d.log(), d.log()[-2000:]
