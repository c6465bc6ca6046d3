"""`user` / `group` (-u / -g): a root master's workers run unprivileged for good (issue 19, item 6).

Each worker's real, effective, saved and filesystem uids and gids, its supplementary groups and
its capabilities are read from /proc/PID/status; reload (HUP), USR2 and the hand-off between
workers still work with them.  Root only: only root can give its workers another user.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import (
    BLUE,
    GREEN,
    Client,
    Daemon,
    handed,
    handoff_conf,
    holder_of,
    lancelotd_cli,
    open_files,
    read_pid,
    rewrite,
    wait_for,
    wait_pool,
)

from lancelotd import privileges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: only a root master can run its "
                                "workers as another user")
NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid)


def ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid (real, effective, saved, fs), Groups, CapEff and CapPrm of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(v) for v in value.split()]
        elif key in ("CapEff", "CapPrm"):
            fields[key] = [int(value.strip(), 16)]
    return fields


def assert_unprivileged(pid: int, uid: int, gid: int, groups: set[int]) -> None:
    seen = ids(pid)
    assert seen["Uid"] == [uid] * 4, seen
    assert seen["Gid"] == [gid] * 4, seen
    assert set(seen["Groups"]) == groups, seen
    assert seen["CapEff"] == [0] and seen["CapPrm"] == [0], seen  # no way back to root


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned 0755 directory the workers' user may enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="lancelotd-priv-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_as(start_daemon, base: Path, *args: str, config: str | None = None, workers: int = 2) -> Daemon:
    pid_file = base / "run" / "lancelotd.pid"  # a directory the master makes, for the workers' user
    d: Daemon = start_daemon("--pid-file", str(pid_file), *args, config=config, workers=workers, wait=False)
    d.pid_file = pid_file
    if "--log-file" in args:  # "listening on" goes there: no port to learn from stderr
        wait_for(lambda: read_pid(pid_file) == d.proc.pid, 10, "the PID file")
    else:
        d.wait_ready()
    wait_pool(d.proc.pid, workers)  # titled: past the privilege drop (it comes before the title)
    return d


@pytest.mark.parametrize("how", ["command line", "config"])
def test_workers_run_as_the_configured_user_and_group(start_daemon, base: Path, how: str) -> None:
    groups = set(os.getgrouplist(NOBODY.pw_name, NOGROUP.gr_gid))
    if how == "command line":
        d = start_as(start_daemon, base, "-u", NOBODY.pw_name, "-g", NOGROUP.gr_name)
    else:
        d = start_as(start_daemon, base, config=f'[server]\nuser = "{NOBODY.pw_name}"\n'
                                               f'group = "{NOGROUP.gr_name}"\n')
    for pid in wait_pool(d.proc.pid, 2):
        assert_unprivileged(pid, NOBODY.pw_uid, NOGROUP.gr_gid, groups)
    assert ids(d.proc.pid)["Uid"] == [0] * 4  # the master keeps root (as nginx's does)
    assert d.ask("What is your name?") == b"My name is Sir Lancelot of Camelot."
    run = d.pid_file.parent
    assert (os.stat(run).st_uid, stat.S_IMODE(os.stat(run).st_mode)) == (NOBODY.pw_uid, 0o750)
    board = os.stat(str(d.pid_file) + ".scoreboard")
    assert (board.st_uid, board.st_gid, stat.S_IMODE(board.st_mode)) == (0, NOGROUP.gr_gid, 0o640)
    inboxes = [p for p in run.iterdir() if ".handoff-" in p.name]
    assert len(inboxes) == 2 and all(p.stat().st_uid == NOBODY.pw_uid for p in inboxes)
    assert lancelotd_cli("status", "--pid-file", str(d.pid_file)).returncode == 0


def test_reload_and_hand_off_keep_the_workers_unprivileged(start_daemon, base: Path) -> None:
    d = start_as(start_daemon, base, "-u", NOBODY.pw_name, config=handoff_conf(workers=2, color="Blue."))
    master = d.proc.pid
    gen1 = wait_pool(master, 2, generation=1)
    sock = d.connect()
    with sock, Client(sock, [BLUE, GREEN]) as client:
        old = holder_of(sock, list(gen1))
        rewrite(d, handoff_conf(workers=2, color="Green."))
        result = lancelotd_cli("reload", "--pid-file", str(d.pid_file), timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        gen2 = wait_pool(master, 2, generation=2, timeout=10)
        wait_for(lambda: client.first(GREEN), 5, "an answer from the new generation")
        client.wait_more(10)
        new = holder_of(sock, list(gen2))
    client.check()
    assert new in gen2 and handed(d.log()).get(old) == [(1, 0)], d.log()[-3000:]
    for pid in gen2:
        assert_unprivileged(pid, NOBODY.pw_uid, NOBODY.pw_gid, set(os.getgrouplist("nobody", NOBODY.pw_gid)))


def test_usr2_upgrade_hands_over_to_unprivileged_workers(start_daemon, base: Path) -> None:
    d = start_as(start_daemon, base, "-u", NOBODY.pw_name, config=handoff_conf(workers=2, color="Blue."))
    old_master = d.proc.pid
    sock = d.connect()
    with sock, Client(sock, [BLUE, GREEN]) as client:
        rewrite(d, handoff_conf(workers=2, color="Green."))
        d.signal(signal.SIGUSR2)
        new_master = wait_for(lambda: (read_pid(d.pid_file) or old_master) != old_master
                              and read_pid(d.pid_file), 15, "the new master's PID in the PID file")
        wait_for(lambda: client.first(GREEN), 10, "an answer from the new master's workers")
        assert d.wait_exit(10) == 0
        client.wait_more(10)
        new_workers = wait_pool(new_master, 2, generation=1)
        serving = holder_of(sock, list(new_workers))
    client.check()
    try:
        assert serving is not None and psutil.Process(serving).ppid() == new_master
        assert ids(new_master)["Uid"] == [0] * 4
        for pid in new_workers:
            assert ids(pid)["Uid"] == [NOBODY.pw_uid] * 4
    finally:
        os.kill(new_master, signal.SIGTERM)
        wait_for(lambda: not psutil.pid_exists(new_master) or
                 psutil.Process(new_master).status() == psutil.STATUS_ZOMBIE, 10, "the new master")


def test_the_log_file_is_the_workers_user_s_and_usr1_reopens_it(start_daemon, base: Path) -> None:
    log = base / "lancelotd.log"
    d = start_as(start_daemon, base, "-u", NOBODY.pw_name, "--log-file", str(log))
    assert os.stat(log).st_uid == NOBODY.pw_uid
    os.rename(log, str(log) + ".1")
    d.signal(signal.SIGUSR1)
    wait_for(lambda: log.exists() and "log file reopened" in log.read_text(), 10, "the reopened log")
    assert os.stat(log).st_uid == NOBODY.pw_uid

    def everyone_writes_the_new_file() -> bool:  # the workers reopen too, as the workers' user
        pids = [d.proc.pid, *(child.pid for child in psutil.Process(d.proc.pid).children())]
        return all(str(log) in names and str(log) + ".1" not in names
                   for names in (set(open_files(pid).values()) for pid in pids))
    wait_for(everyone_writes_the_new_file, 10, "the master and the workers to write the new log")
    assert "cannot reopen log file" not in log.read_text() + Path(str(log) + ".1").read_text()


def test_an_unknown_user_is_refused_clearly(base: Path) -> None:
    result = lancelotd_cli("serve", "-b", "127.0.0.1:0", "--pid-file", str(base / "l.pid"),
                           "-u", "no-such-user-x")
    assert result.returncode == 1
    assert "no such user 'no-such-user-x'" in result.stderr, result.stderr
    checked = lancelotd_cli("check-config", "-c", str(_config(base, 'user = "no-such-user-x"')))
    assert checked.returncode == 1 and "server.user: no such user" in checked.stderr, checked.stderr
    alone = lancelotd_cli("check-config", "-c", str(_config(base, 'group = "nogroup"')))
    assert alone.returncode == 1 and "server.group: needs server.user" in alone.stderr, alone.stderr


def _config(base: Path, line: str) -> Path:
    path = base / "c.toml"
    path.write_text(f"[server]\n{line}\n")
    return path


def test_a_master_not_started_as_root_refuses_another_user() -> None:
    """The check itself, as uid nobody (a fork that gave up root: python is not reachable for nobody)."""
    from test_root_trust import as_nobody

    def attempt() -> str:
        privileges.resolve.cache_clear()
        try:
            privileges.prepare("root", "")
        except privileges.PrivilegeError as e:
            return str(e)
        return "accepted"
    said = as_nobody(attempt)
    assert isinstance(said, str) and "only a master started as root" in said, said
