"""The README's first command on a machine where lancelotd never ran (issue 9, item 1).

Bare `lancelotd`, with no --pid-file: the default PID file's directory does
not exist yet and must be created (0700 for a user, 0750 for root under
/run), and a directory someone else could change under us is refused.
The config comes from $LANCELOTD_CONFIG (127.0.0.1:0, one worker, no
pid_file key) so the tests bind no fixed port.  As root, "an ordinary user"
is nobody: the daemon runs as uid 65534 in a private directory of its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import NOBODY, ROOT, as_user, recv_until, scaled, wait_for

from lancelotd import runtime

USER_UID = NOBODY if ROOT else os.geteuid()
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)$", re.M)
CONFIG = '[server]\nbind = ["127.0.0.1:0"]\nworkers = 1\n'


def lancelotd() -> list[str]:
    """The console script the README runs, else the module."""
    script = Path(sys.executable).parent / "lancelotd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lancelotd"]


def chown_to_user(path: Path) -> None:
    if ROOT:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)


class Run:
    """One process tree started by a test; `kill_all` reaps it whatever happened."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log_file = log
        self.out = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.out,
                                     start_new_session=True, env=env, cwd=cwd)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_pid_file(self, pid_file: Path, pid: int | None = None) -> None:
        pid = pid or self.proc.pid

        def written() -> bool:
            if self.proc.poll() is not None and self.proc.returncode != 0:
                raise AssertionError(f"lancelotd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return int(pid_file.read_text()) == pid
            except (OSError, ValueError):
                return False
        wait_for(written, 15, f"the PID file {pid_file}")

    def kill_all(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(scaled(10))
        self.out.close()


@pytest.fixture
def home() -> Iterator[Path]:
    """A private directory of the test user's own (pytest's tmp_path is root's alone when root)."""
    path = Path(tempfile.mkdtemp(prefix="lancelotd-test-", dir="/tmp"))
    chown_to_user(path)
    (path / "lancelotd.toml").write_text(CONFIG)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn() -> Iterator:
    runs: list[Run] = []

    def start(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Run:
        runs.append(Run(argv, env, cwd, log))
        return runs[-1]
    yield start
    for run in runs:
        run.kill_all()


def environment(home: Path, xdg: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_RUNTIME_DIR", "LANCELOTD_CONFIG", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
    env.update(LANCELOTD_CONFIG=str(home / "lancelotd.toml"), HOME=str(home))
    if xdg is not None:
        env["XDG_RUNTIME_DIR"] = str(xdg)
    return env


def make_xdg(home: Path) -> Path:
    xdg = home / "xdg"
    xdg.mkdir(mode=0o700)
    chown_to_user(xdg)
    return xdg


def ask(log: str) -> bytes:
    match = LISTENING.search(log)
    assert match, log
    with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=scaled(5)) as sock:
        sock.sendall(b"What is your name?")
        return recv_until(sock, b".")


def serve_and_stop(run: Run, pid_file: Path, directory_mode: int, owner: int) -> None:
    """The bare command serves, made its directory as asked, and leaves cleanly on TERM."""
    run.wait_pid_file(pid_file)
    assert ask(run.log()) == b"My name is Sir Lancelot of Camelot."
    st = os.stat(pid_file.parent, follow_symlinks=False)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == owner
    assert stat.S_IMODE(st.st_mode) == directory_mode, oct(st.st_mode)
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(scaled(15)) == 0, run.log()
    assert not pid_file.exists()


def test_bare_command_creates_its_runtime_directory_under_xdg(home: Path, spawn) -> None:
    xdg = make_xdg(home)
    run = spawn(as_user() + lancelotd(), environment(home, xdg), home, home / "out.log")
    serve_and_stop(run, xdg / "lancelotd" / "lancelotd.pid", 0o700, USER_UID)


def private_tmp(setup: str = "") -> list[str]:
    """The command prefix that runs lancelotd with a /tmp of its own (an empty tmpfs in a private
    mount namespace; the test's home, under the real /tmp, is bound back at its path), after the
    shell commands `setup` ran there.  /tmp/lancelotd-UID is then nobody else's: the real one,
    perhaps a running lancelotd's, is neither read nor removed.  Skips where that cannot be made.

    As root, a mount namespace (as_user() then drops to nobody).  As a user, a user namespace
    where we are root to mount, and in it a second one that maps us back to our own uid, so
    lancelotd runs as the user it would be."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) for a private /tmp (the /tmp fallback is one shared path)")
    namespace = ["unshare", "--mount", "--propagation", "private"]
    back_to_us = "" if ROOT else f"unshare --user --map-user={USER_UID} "
    if not ROOT:
        namespace.insert(1, "--map-root-user")
    probe = subprocess.run([*namespace, "sh", "-c", f"mount -t tmpfs t /tmp && {back_to_us}stat -c %u /"],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=scaled(30))
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /tmp (the /tmp fallback is one shared path): "
                    f"{probe.stderr.strip()}")
    if probe.stdout.strip() not in ("0", str(USER_UID)):
        # A user namespace cannot map the host's root: / looks owned by the overflow uid, and
        # lancelotd rightly refuses a runtime directory under a / that is neither root's nor ours.
        pytest.skip(f"in the user namespace a private /tmp needs, / is owned by uid {probe.stdout.strip()} "
                    "(the host's root, unmapped): run as root to test the /tmp fallback")
    # The real /tmp is held at /mnt (in the namespace only) while /tmp is covered; then what must
    # stay reachable under it is bound back: the test's home, and this checkout and its Python
    # when they live in /tmp too (a CI clone in /tmp/...).
    back = 'mkdir -p "$HOME" && mount --bind "/mnt${HOME#/tmp}" "$HOME" && '
    for path in kept_under_tmp():
        held = shlex.quote(f"/mnt{str(path).removeprefix('/tmp')}")
        back += f"mkdir -p {shlex.quote(str(path))} && mount --bind {held} {shlex.quote(str(path))} && "
    script = ("mount --bind /tmp /mnt && mount -t tmpfs -o mode=1777 lancelotd-test /tmp && " + back
              + setup + f'exec {back_to_us}"$@"')
    return [*namespace, "sh", "-c", script, "sh"]


def kept_under_tmp() -> list[Path]:
    """This checkout and the Python running the tests, where they are under /tmp (outermost only)."""
    paths = sorted({Path(__file__).resolve().parents[1], Path(sys.prefix).resolve()})
    under = [path for path in paths if path.is_relative_to("/tmp") and path != Path("/tmp")]
    return [path for path in under
            if not any(path != other and path.is_relative_to(other) for other in under)]


def inside(run: Run, path: Path) -> Path:
    """`path` as the process of `run` sees it (its own mount namespace), while it runs."""
    return Path(f"/proc/{run.proc.pid}/root{path}")


FALLBACK = Path(f"/tmp/lancelotd-{USER_UID}")  # in the private /tmp only


def test_bare_command_without_xdg_uses_a_private_directory_in_tmp(home: Path, spawn) -> None:
    prefix = private_tmp()
    run = spawn(prefix + as_user() + lancelotd(), environment(home, None), home, home / "out.log")
    pid_file = inside(run, FALLBACK / "lancelotd" / "lancelotd.pid")
    run.wait_pid_file(pid_file)
    st = os.lstat(inside(run, FALLBACK))
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == USER_UID and stat.S_IMODE(st.st_mode) == 0o700
    serve_and_stop(run, pid_file, 0o700, USER_UID)
    assert not FALLBACK.exists() or FALLBACK.stat().st_ino != st.st_ino  # made in the private /tmp


def refused(run: Run, *phrases: str) -> None:
    assert run.proc.wait(scaled(15)) == 1, run.log()
    for phrase in phrases:
        assert phrase in run.log(), run.log()


def test_the_tmp_fallback_refuses_a_planted_symlink(home: Path, spawn) -> None:
    target = home / "planted"
    target.mkdir(mode=0o700)
    chown_to_user(target)
    prefix = private_tmp(setup=f"ln -s '{target}' '{FALLBACK}' && ")
    run = spawn(prefix + as_user() + lancelotd(), environment(home, None), home, home / "out.log")
    refused(run, f"{FALLBACK} is a symbolic link")
    assert not list(target.iterdir()), "lancelotd wrote through the planted link"


@pytest.mark.parametrize("case", ["group-writable", "world-writable", "symlink", "other-owner"])
def test_an_unsafe_runtime_directory_is_refused(home: Path, spawn, case: str) -> None:
    if case == "other-owner" and not ROOT:
        pytest.skip("needs root to give a directory to another user")
    xdg = make_xdg(home)
    runtime = xdg / "lancelotd"
    if case == "symlink":
        (xdg / "real").mkdir(mode=0o700)
        chown_to_user(xdg / "real")
        runtime.symlink_to(xdg / "real")
        chown_to_user(runtime)
        expected = f"{runtime} is a symbolic link"
    else:
        runtime.mkdir()
        chown_to_user(runtime)
        if case == "other-owner":
            os.chown(runtime, 12345, 12345)
            os.chmod(runtime, 0o755)
            expected = f"directory {runtime} is owned by uid 12345, not by us"
        else:
            os.chmod(runtime, 0o770 if case == "group-writable" else 0o777)
            expected = f"directory {runtime} is writable by group or others"
    run = spawn(as_user() + lancelotd(), environment(home, xdg), home, home / "out.log")
    refused(run, "cannot use PID file", expected)
    assert not os.path.exists(runtime / "lancelotd.pid")


def private_run_possible() -> str:
    """'' when this test can mount a tmpfs on /run in a mount namespace of its own, else why not."""
    if not ROOT:
        return "needs root (the default PID file of root is under /run)"
    if not shutil.which("unshare"):
        return "no unshare(1)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs lancelotd-test /run"], capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"cannot mount a private /run: {probe.stderr.strip()}"


def test_bare_command_as_root_creates_run_lancelotd(home: Path, spawn) -> None:
    why_not = private_run_possible()
    if why_not:
        pytest.skip(why_not)
    # unshare and sh exec: the master is the process we started, and /run is its own empty tmpfs.
    private_run = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs -o mode=0755 lancelotd-test /run && exec "$@"', "sh"]
    run = spawn(private_run + lancelotd(), environment(home, home / "ignored-as-root"), home,
                home / "out.log")
    seen_from_inside = Path(f"/proc/{run.proc.pid}/root/run/lancelotd/lancelotd.pid")
    serve_and_stop(run, seen_from_inside, 0o750, 0)  # 0750: the scoreboard holds client addresses


def reap(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def test_serve_daemon_with_the_default_pid_file(home: Path) -> None:
    xdg = make_xdg(home)
    env = environment(home, xdg)
    pid_file = xdg / "lancelotd" / "lancelotd.pid"
    log_file = home / "lancelotd.log"
    tree: list[int] = []  # what --daemon detaches is ours to reap: the session is a subreaper (conftest)
    try:
        launcher = subprocess.run(
            [*as_user(), *lancelotd(), "serve", "--daemon", "-c", env["LANCELOTD_CONFIG"],
             "--log-file", str(log_file)],
            env=env, cwd=home, capture_output=True, text=True, timeout=scaled(60))
        assert launcher.returncode == 0, launcher.stderr + log_file.read_text(errors="replace")
        master = int(pid_file.read_text())
        tree = [master, *(p.pid for p in psutil.Process(master).children())]
        assert stat.S_IMODE(os.stat(pid_file.parent).st_mode) == 0o700
        assert ask(log_file.read_text()) == b"My name is Sir Lancelot of Camelot."
        stop = subprocess.run([*as_user(), *lancelotd(), "stop"], env=env, cwd=home, capture_output=True,
                              text=True, timeout=scaled(60))
        assert stop.returncode == 0, stop.stderr
        assert f"stopped master {master}" in stop.stdout
        assert not pid_file.exists()
    finally:
        reap(tree)


# --- the directory rules themselves, on the real filesystem --------------------------------------

def test_created_directories_get_the_mode_asked_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        runtime.ensure_directory(str(tmp_path / "a" / "b"), 0o755)
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b"):
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o755


def test_a_symlink_above_the_checked_part_is_followed(tmp_path: Path) -> None:
    """/var/run -> /run: a link in a directory only root or we can change is fine."""
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    runtime.ensure_directory(str(tmp_path / "link" / "lancelotd"), 0o700)
    assert (tmp_path / "real" / "lancelotd").is_dir()


def test_a_shared_directory_without_the_sticky_bit_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(runtime.RuntimeDirError, match=f"{shared} is writable by others and not sticky"):
        runtime.ensure_directory(str(shared / "mine" / "lancelotd"), 0o700)
    assert not (shared / "mine").exists()


@pytest.mark.skipif(not ROOT, reason="needs root to give a directory to another user")
def test_an_ancestor_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 12345, 12345)
    with pytest.raises(runtime.RuntimeDirError, match="owned by uid 12345, neither root nor us"):
        runtime.ensure_directory(str(theirs / "lancelotd"), 0o700)
