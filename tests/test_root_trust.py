"""Root's commands never trust what the service user can write (issue 19, items 1-4).

Each test plays the service user for real: a forked child that has given up
root for `nobody` (os.setresuid, not root pretending) plants links, FIFOs and
forged records in a runtime directory it owns; then root's `lancelotd drain`,
`undrain`, `stop`, `reload`, `reopen-logs` and `status` run on it.  No file
outside the runtime directory may change (content, mode, owner), no foreign
process may be signalled, no command may hang, and each must say what it
refused.  Root only: without root there is no other user to become.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from helpers import Daemon, clean_env, lancelotd_cli, scaled, wait_for
from setproctitle import setproctitle

from lancelotd import cli, pidfile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the attacker is another real uid "
                                "(nobody) and the victim is root's command")
NOBODY = 65534


def as_nobody(action: Callable[[], object]) -> object:
    """Run `action` in a forked child as uid/gid nobody; its JSON-able result, or AssertionError."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            os.write(w, json.dumps(action()).encode())
            code = 0
        except BaseException as e:
            os.write(w, json.dumps({"error": repr(e)}).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    result = json.loads(out or b"null")
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned 0755 directory nobody can enter, with the service's runtime directory in it."""
    path = Path(tempfile.mkdtemp(prefix="lancelotd-trust-"))
    path.chmod(0o755)
    run = path / "run"
    run.mkdir(mode=0o750)
    os.chown(run, NOBODY, NOBODY)
    victim = path / "victim"
    victim.write_text("root's secret\n")
    victim.chmod(0o600)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fingerprint(path: Path) -> tuple:
    st = os.lstat(path)
    return path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def outside(base: Path) -> dict[Path, tuple]:
    """Every file outside the runtime directory, as it is."""
    return {p: fingerprint(p) for p in base.iterdir() if p.is_file() and not p.is_symlink()}


# A PID namespace of its own for root's command: there it is PID 1 and what it forks follows,
# so the PIDs it may name files after are known, not guessed among the host's next ones.
OWN_PIDS = ["unshare", "--pid", "--fork", "--mount-proc"]
FIRST_PIDS = range(1, 101)


def own_pid_namespace_or_skip() -> None:
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) for a PID namespace of the command's own")
    probe = subprocess.run([*OWN_PIDS, "true"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=scaled(30))
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.strip()}")


def cli_in_own_pid_namespace(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """`lancelotd ARGS` as PID 1 of a PID namespace of its own."""
    return subprocess.run([*OWN_PIDS, sys.executable, "-m", "lancelotd", *args], capture_output=True,
                          text=True, timeout=scaled(timeout), env=clean_env(), stdin=subprocess.DEVNULL)


# --- item 1: drain and undrain never write through a planted link ----------------------------

def test_root_drain_never_writes_through_links_the_service_user_planted(base: Path) -> None:
    own_pid_namespace_or_skip()
    run, victim = base / "run", base / "victim"
    pid_file = run / "l.pid"
    before = outside(base)

    def plant() -> int:
        for pid in FIRST_PIDS:  # the old code's temporary name, for every PID root's drain can get
            os.symlink(victim, f"{pid_file}.drain.{pid}.tmp")
        os.symlink(victim, f"{pid_file}.drain")
        return 0
    as_nobody(plant)

    drained = cli_in_own_pid_namespace("drain", "--pid-file", str(pid_file), "--no-wait")
    assert drained.returncode == 0, drained.stderr
    assert outside(base) == before, "root's drain changed a file outside the runtime directory"
    st = os.lstat(f"{pid_file}.drain")
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644

    undrained = cli_in_own_pid_namespace("undrain", "--pid-file", str(pid_file), "--no-wait")
    assert undrained.returncode == 0, undrained.stderr
    assert not os.path.lexists(f"{pid_file}.drain")
    assert outside(base) == before


def test_root_drain_refuses_a_drain_file_in_a_shared_directory(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    config = base / "c.toml"
    config.write_text(f'[balancer]\ndrain_file = "{shared}/drain"\n')
    out = lancelotd_cli("drain", "-c", str(config), "--pid-file", str(base / "run" / "l.pid"), "--no-wait")
    assert out.returncode == 1
    assert "writable by group or others" in out.stderr and "refusing" in out.stderr, out.stderr
    assert not (shared / "drain").exists()


def test_root_drain_refuses_a_directory_link_the_service_user_planted(base: Path) -> None:
    """drain_file under the runtime directory, where the service user made a link to root's directory."""
    run = base / "run"
    as_nobody(lambda: os.symlink(base, run / "state") or 0)
    config = base / "c.toml"
    config.write_text(f'[balancer]\ndrain_file = "{run}/state/drain"\n')
    before = outside(base)
    out = lancelotd_cli("drain", "-c", str(config), "--pid-file", str(run / "l.pid"), "--no-wait")
    assert out.returncode == 1
    assert f"{run}/state is a symbolic link: refusing to follow it" in out.stderr, out.stderr
    assert not (base / "drain").exists() and outside(base) == before


# --- item 2: a forged PID file and start record signal nothing ------------------------------

@pytest.fixture
def bystander() -> Iterator[Callable[[str], subprocess.Popen]]:
    """bystander(title): a root process (that dies of TERM, HUP or USR1) titled as asked."""
    started: list[subprocess.Popen] = []

    def start(title: str) -> subprocess.Popen:
        code = ("import setproctitle, sys, time; setproctitle.setproctitle(sys.argv[1]); "
                "print('ok', flush=True); time.sleep(120)")
        proc = subprocess.Popen([sys.executable, "-c", code, title], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"
        started.append(proc)
        return proc
    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def forge(pid_file: Path, pid: int, record: bool) -> None:
    """As nobody: a PID file naming `pid`, and (optionally) a start record that matches it."""
    identity = pidfile.identity(pid)

    def write() -> int:
        pid_file.write_text(f"{pid}\n")
        if record:
            Path(pidfile.record_path(str(pid_file), pid)).write_text(f"{identity}\n")
        return 0
    as_nobody(write)


@pytest.mark.parametrize("title", ["sleeper", "lancelotd: master [/etc/lancelotd/lancelotd.toml]"])
@pytest.mark.parametrize("name", ["l.pid", "l.pid.oldbin"])
def test_a_forged_pid_file_makes_root_signal_nothing(base: Path, bystander, title: str, name: str) -> None:
    """stop, reload, reopen-logs (logrotate's fallback) and the .oldbin path: every proof or no signal."""
    victim = bystander(title)
    pid_file = base / "run" / "l.pid"
    forge(base / "run" / name, victim.pid, record=True)
    for command in (["stop", "--timeout", "2"], ["reload", "--timeout", "2"], ["reopen-logs"]):
        out = lancelotd_cli(*command, "--pid-file", str(pid_file))
        assert victim.poll() is None, f"root's {command[0]} signalled PID {victim.pid}: {out}"
        said = out.stdout + out.stderr
        if name == "l.pid":
            why = "not lancelotd" if title == "sleeper" else "runs as uid 0 while the PID file is uid 65534"
            assert why in said, said
    assert psutil.Process(victim.pid).status() != psutil.STATUS_ZOMBIE


# --- root's status: no FIFO hangs it, no link leads it elsewhere ----------------------------

def fake_master(run: Path) -> int:
    """As nobody: a process titled as a master, named by a PID file of nobody's; its PID."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        setproctitle("lancelotd: master [fake]")
        (run / "l.pid").write_text(f"{os.getpid()}\n")
        os.write(w, b"x")
        time.sleep(60)
        os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    return pid


@pytest.mark.parametrize("what", ["pid-fifo", "pid-link", "scoreboard-fifo", "scoreboard-link"])
def test_root_status_neither_hangs_on_a_fifo_nor_follows_a_link(base: Path, what: str) -> None:
    run = base / "run"
    fake = fake_master(run) if what.startswith("scoreboard") else 0
    target = run / ("l.pid" if what.startswith("pid") else "l.pid.scoreboard")

    def plant() -> int:
        if target.exists():
            target.unlink()
        if what.endswith("fifo"):
            os.mkfifo(target)
        else:
            os.symlink(base / "victim", target)
        return 0
    try:
        as_nobody(plant)
        started = time.monotonic()
        out = lancelotd_cli("status", "--pid-file", str(run / "l.pid"), timeout=10)
        assert time.monotonic() - started < scaled(10)
        assert out.returncode == 4, out
        kind = "a FIFO" if what.endswith("fifo") else "a symbolic link"
        assert f"{target} is {kind}" in out.stderr, out.stderr
    finally:
        if fake:
            os.kill(fake, 9)
            os.waitpid(fake, 0)


# --- item 3: a drain file counts only where nobody else can put one ---------------------------

def test_a_drain_file_in_a_shared_directory_does_not_drain_the_host(base: Path, start_daemon) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    as_nobody(lambda: (shared / "drain").write_text("drained by a stranger\n") and 0)
    d: Daemon = start_daemon(workers=1, config=f'[balancer]\ndrain_file = "{shared}/drain"\n')
    out = lancelotd_cli("status", "--json", "--pid-file", str(d.pid_file))
    assert json.loads(out.stdout)["balancer"]["drained"] is False, out.stdout
    wait_for(lambda: "cannot check the drain file" in d.log(), 10, "the refusal in the log")
    assert "writable by group or others" in d.log()


def test_a_drain_file_of_a_stranger_does_not_count(base: Path) -> None:
    from lancelotd import agent
    run = base / "run"
    run.chmod(0o755)
    os.chown(run, 0, 0)
    (run / "drain").write_text("x\n")
    assert agent.is_drained(str(run / "drain"))
    os.chown(run / "drain", NOBODY, NOBODY)
    with pytest.raises(OSError, match="owned by uid 65534"):
        agent.is_drained(str(run / "drain"))


# --- item 4: client addresses are not for every local user ------------------------------------

def test_scoreboard_and_runtime_directory_are_not_world_readable(base: Path, start_daemon) -> None:
    run = base / "fresh" / "lancelotd"  # made by the master
    d: Daemon = start_daemon("--pid-file", str(run / "l.pid"), workers=1, wait=False)
    d.pid_file = run / "l.pid"
    d.wait_ready(workers=1)
    board = run / "l.pid.scoreboard"
    assert stat.S_IMODE(os.stat(board).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o750
    (base / "fresh").chmod(0o755)

    def status_as_nobody() -> dict:
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["status", "--pid-file", str(run / "l.pid")])
        return {"code": code, "err": err.getvalue()}
    seen = as_nobody(status_as_nobody)
    assert isinstance(seen, dict) and seen["code"] == 4, seen
    assert "permission denied" in seen["err"] and "run this as root" in seen["err"], seen
    assert lancelotd_cli("status", "--pid-file", str(run / "l.pid")).returncode == 0
