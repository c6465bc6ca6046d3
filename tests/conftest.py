"""Harness for integration tests: real lancelotd processes on loopback.

Every daemon runs in its own session (process group), so teardown can kill
and reap the master and every worker it forked, even when a test fails.
Readiness is the PID file (written once the sockets are bound) and the
"listening on" log line that gives the ephemeral port; no fixed sleeps.

The whole session is a child subreaper: an orphan of our subtree (a USR2
successor, a `--daemon` master, the workers of a SIGKILLed master) becomes
our child, not PID 1's (which, on this machine, reaps nobody).  After each
test, any process that test started and left running is killed, reaped and
reported as an error of the test; see `no_leaked_processes`.

Shared helpers live in helpers.py; wait_for, recv_until, recv_all and
LISTENING are re-exported here for the modules that import them from conftest.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from helpers import LISTENING, recv_all, recv_until, scaled, title, wait_for
from loadgen import build as build_loadgen

__all__ = ["LISTENING", "Daemon", "recv_all", "recv_until", "wait_for"]

class Daemon:
    """One `lancelotd serve` process tree started by a test."""

    def __init__(self, tmp: Path, args: list[str], config: str | None, env: dict[str, str] | None,
                 default_bind: bool = True) -> None:
        self.tmp = tmp
        self.pid_file = tmp / "lancelotd.pid"
        self.log_file = tmp / "lancelotd.log"
        self.config_file = tmp / "lancelotd.toml"
        cmd = [sys.executable, "-m", "lancelotd", "serve", "--pid-file", str(self.pid_file)]
        if config is not None:
            self.config_file.write_text(config)
            cmd += ["-c", str(self.config_file)]
        if default_bind and not any(a in ("-b", "--bind") for a in args):
            cmd += ["-b", "127.0.0.1:0"]
        self.cmd = cmd + args
        self.stderr = open(self.log_file, "ab")
        full_env = dict(os.environ, **(env or {}))
        full_env.pop("LANCELOTD_CONFIG", None)
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr,
            start_new_session=True, env=full_env,
        )
        self.port = 0

    # --- readiness ------------------------------------------------------

    def wait_ready(self, timeout: float = 10.0, workers: int | None = None) -> Daemon:
        """Wait for the PID file; then learn the port; then (optionally) N workers."""
        def pid_file_or_exit() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"lancelotd exited with {self.proc.returncode}:\n{self.log()}")
            try:  # a stale file from an earlier process does not count
                return int(self.pid_file.read_text()) == self.proc.pid
            except (OSError, ValueError):
                return False
        wait_for(pid_file_or_exit, timeout, "the PID file")
        match = LISTENING.search(self.log())
        assert match, self.log()
        self.port = int(match.group(2))
        if workers is not None:
            self.wait_workers(workers, timeout)
        return self

    def wait_workers(self, count: int, timeout: float = 10.0) -> list[psutil.Process]:
        def exactly_count() -> list[psutil.Process] | None:
            workers = self.workers()
            return workers if len(workers) == count else None
        return wait_for(exactly_count, timeout, f"{count} workers")  # type: ignore[return-value]

    def workers(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        alive = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
            except psutil.NoSuchProcess:
                pass
        return alive

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    # --- talking ----------------------------------------------------------

    def connect(self, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=scaled(timeout))
        return sock

    def ask(self, question: bytes | str, timeout: float = 5.0) -> bytes:
        """One question on a new connection; the answer up to its '.'."""
        if isinstance(question, str):
            question = question.encode()
        with self.connect(timeout) as sock:
            sock.sendall(question)
            return recv_until(sock, b".")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(scaled(timeout))

    def kill_all(self) -> None:
        """Teardown: SIGKILL the whole process group, reap the master and its orphaned workers."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(scaled(10))
            reap_group(self.proc.pid)
        except (subprocess.TimeoutExpired, AssertionError):
            pass  # no_leaked_processes names what is left
        self.stderr.close()


def reap_group(pgid: int, timeout: float = 10.0) -> None:
    """Wait until no process of group `pgid` is left below us; reap those that became our children."""
    def group_gone() -> bool:
        left = False
        for proc in psutil.Process().children(recursive=True):
            try:
                if os.getpgid(proc.pid) != pgid:
                    continue
                left = True
                if proc.ppid() == os.getpid():
                    os.waitpid(proc.pid, os.WNOHANG)
            except (OSError, psutil.Error):
                pass
        return not left
    wait_for(group_gone, timeout, f"the processes of group {pgid} to be reaped")


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start_daemon(*args, config=TOML, wait=True, workers=N) -> a ready Daemon.

    Unless args hold -b, the daemon listens on 127.0.0.1:0 through `-b`, which
    a reload keeps; pass default_bind=False to let the config's [server] bind rule.
    """
    started: list[Daemon] = []

    def start(*args: str, config: str | None = None, wait: bool = True, workers: int | None = None,
              env: dict[str, str] | None = None, subdir: str | None = None,
              default_bind: bool = True) -> Daemon:
        tmp = tmp_path / (subdir or f"d{len(started)}")
        tmp.mkdir(exist_ok=True)
        extra = list(args)
        if workers is not None and "-w" not in extra:
            extra += ["-w", str(workers)]
        daemon = Daemon(tmp, extra, config, env, default_bind)
        started.append(daemon)
        if wait:
            daemon.wait_ready(workers=workers)
        return daemon

    yield start
    for daemon in started:
        daemon.kill_all()


@pytest.fixture(scope="session")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The load generator's command: the C loadgen when it builds, else tests/pyload.py."""
    return build_loadgen(tmp_path_factory.mktemp("loadgen"))


# --- every process a test starts is reaped --------------------------------------------

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

Key = tuple[int, float]  # (pid, start time): a reused PID is another process


def become_subreaper() -> None:
    """Orphans of our subtree are reparented to this process (Linux), so we can reap them."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def descendants() -> dict[Key, psutil.Process]:
    """Every process below this one, zombies included."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            found[(proc.pid, proc.create_time())] = proc
        except psutil.Error:
            pass
    return found


def strays(before: set[Key]) -> list[psutil.Process]:
    """Descendants started since `before` was taken that no earlier process owns.

    A process below one that was already there (the systemd sandbox a module boots, and
    the services it starts) lives by its owner's rules, not by this test's.
    """
    procs = descendants()
    by_pid = {key[0]: key for key in procs}
    me, found = os.getpid(), []
    for key, proc in procs.items():
        if key in before:
            continue
        try:
            parent = proc.ppid()
        except psutil.Error:
            continue
        owned = False
        while parent != me:  # walk up: is an ancestor older than the test?
            parent_key = by_pid.get(parent)
            if parent_key is None:
                break  # the parent just exited: the process is ours now
            if parent_key in before:
                owned = True
                break
            try:
                parent = procs[parent_key].ppid()
            except psutil.Error:
                break
        if not owned:
            found.append(proc)
    return found


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} ({proc.status()}) {title(proc) or proc.name()!r}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


def reap_strays(before: set[Key], timeout: float = 10.0) -> list[str]:
    """Kill what was left running since `before`, reap every zombie child; what was running."""
    leaked: dict[int, str] = {}
    deadline = time.monotonic() + scaled(timeout)
    while left := strays(before):
        for proc in left:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    leaked.setdefault(proc.pid, describe(proc))
                    proc.kill()
                elif proc.ppid() == os.getpid():
                    os.waitpid(proc.pid, os.WNOHANG)
            except (psutil.Error, ChildProcessError):
                pass
        if time.monotonic() > deadline:
            leaked.update({p.pid: describe(p) + " NOT REAPED" for p in left})
            break
        time.sleep(0.01)
    return list(leaked.values())


@pytest.fixture(scope="session", autouse=True)
def session_subreaper() -> Iterator[None]:
    """The session reaps every orphan of its subtree; at its end nothing may be left."""
    become_subreaper()
    yield
    leaked = reap_strays(set())
    if leaked:
        pytest.fail("processes left at the end of the session (killed): " + "; ".join(leaked))


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """A test that leaves a process running fails (in teardown); the process is killed and reaped.

    Autouse, so it is set up before the test's own fixtures and torn down after them:
    what `start_daemon` and the like reap does not count.  Zombies are reaped, not blamed.
    """
    before = set(descendants())
    yield
    leaked = reap_strays(before)
    if leaked:
        pytest.fail("the test left processes running (killed): " + "; ".join(leaked))


@pytest.fixture
def subreaper() -> None:
    """Kept for tests that name it: the whole session is a child subreaper already."""


# --- markers, by rule -------------------------------------------------------------------------
# Applied here, from what a test and its fixtures say, so that no test can forget its marker:
#   unit      starts no process (checked: a unit test that reaps a child fails, see below)
#   load      runs a load generator;  slow: minutes (the soak);  scaleout: the HAProxy cluster
#   systemd   boots a real systemd;   root: needs root (skips otherwise)
# Tiers (README): `pytest -m unit` (seconds), `pytest -m "not load and not slow and not scaleout"`
# (real daemons, no storms or clusters), `pytest` (everything: what .ci/run runs).

PROCESS_SIGNS = ("start_daemon", "subprocess", "popen", "lancelotd_cli", "fork", "sdsandbox", "cluster",
                 "spawn", "loadgen", "pyload", "lancelot_load", "daemon(", "os.system", "unshare", "run_cli")
LOAD_SIGNS = ("loadgen", "pyload", "lancelot_load")
MODULE_MARKERS = {"test_soak": "slow", "test_scaleout": "scaleout", "test_systemd": "systemd"}
CALL = re.compile(r"\b([A-Za-z_]\w*)\(")
TESTS = Path(__file__).resolve().parent
HARNESS = {"session_subreaper", "no_leaked_processes", "unit_starts_no_process"}  # every test uses them


def _sources(item: pytest.Item) -> str:
    """The source of the test, of every fixture it uses, and of the tests' own functions they call
    (three calls deep: a module's helper that starts the daemon is a sign too)."""
    funcs = [getattr(item, "function", None)]
    for name in getattr(item, "fixturenames", ()):
        if name not in HARNESS:
            funcs += [fixturedef.func for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ())]  # noqa: SLF001
    texts: list[str] = []
    seen: set[object] = set()
    for _depth in range(4):
        called = []
        for func in funcs:
            if func in seen or not callable(func):
                continue
            seen.add(func)
            try:
                text = inspect.getsource(func)
            except (OSError, TypeError):
                continue
            texts.append(text)
            scope = getattr(func, "__globals__", {})
            found = (inspect.unwrap(scope[name]) for name in CALL.findall(text) if callable(scope.get(name)))
            called += [f for f in found if inspect.isfunction(f) and _ours(f)]  # unwrap: @contextmanager
        funcs = called
    return "\n".join(texts).lower()  # the signs are matched in lower case


def _ours(func: Callable) -> bool:
    """A function of the tests' own (tests/), not of lancelotd or a library."""
    try:
        return Path(inspect.getsourcefile(func) or "").parent == TESTS
    except TypeError:
        return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__ if getattr(item, "module", None) else ""
        text = _sources(item)
        marks = {MODULE_MARKERS[module]} if module in MODULE_MARKERS else set()
        if any(sign in text for sign in LOAD_SIGNS):
            marks.add("load")
        if "sdsandbox" in text:
            marks.add("systemd")
        skips = " ".join(str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))
        if "geteuid" in text or "root" in skips:
            marks.add("root")
        if not marks and not any(sign in text for sign in PROCESS_SIGNS):
            marks.add("unit")
        for mark in marks:
            item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture(autouse=True)
def unit_starts_no_process(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test marked unit must not start a process: any child reaped meanwhile shows in RUSAGE_CHILDREN."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    yield
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if (after.ru_minflt, after.ru_utime, after.ru_stime) != (before.ru_minflt, before.ru_utime,
                                                              before.ru_stime):
        pytest.fail("marked unit (conftest.py's rule) but started a process: teach PROCESS_SIGNS its sign")
