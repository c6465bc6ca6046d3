"""Fixtures for the tests (the helpers they use are in helpers/, one definition each).

Every daemon runs in its own session (process group), so teardown can kill and reap the master
and every worker it forked, even when a test fails.

The whole session is a child subreaper: an orphan of our subtree (a USR2 successor, a `--daemon`
master, the workers of a SIGKILLed master) becomes our child, not PID 1's (which, on this
machine, reaps nobody).  After each test, any process that test started and left running is
killed, reaped and reported as an error of the test; see `no_leaked_processes`.
"""

from __future__ import annotations

import inspect
import re
import resource
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Daemon, Wrapped, become_subreaper, descendants, reap_strays
from loadgen import build as build_loadgen


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start_daemon(*args, config=TOML, wait=True, workers=N) -> a ready Daemon.

    Unless args hold -b, the daemon listens on 127.0.0.1:0 through `-b`, which
    a reload keeps; pass default_bind=False to let the config's [server] bind rule.
    """
    started: list[Daemon] = []
    yield _starter(tmp_path, started)
    for daemon in started:
        daemon.kill_all()


@pytest.fixture(scope="module")
def start_shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """start_daemon for a whole module: a daemon that its tests only ask (no signal, reload,
    count or state another test could see), started once instead of once a test.

    Set up before any test's `no_leaked_processes` looks (a wider scope is set up first), so its
    processes, and the workers it respawns, are no test's leak; torn down after the module's
    last test, when what it started must be gone like any test's.
    """
    before = set(descendants())
    started: list[Daemon] = []
    yield _starter(tmp_path_factory.mktemp("shared"), started)
    for daemon in started:
        daemon.kill_all()
    leaked = reap_strays(before)
    if leaked:
        pytest.fail("the module's shared daemon left processes running (killed): " + "; ".join(leaked))


def _starter(root: Path, started: list[Daemon]) -> Callable[..., Daemon]:
    """The start() of start_daemon and start_shared_daemon: each daemon in its own dir of `root`."""
    def start(*args: str, config: str | None = None, wait: bool = True, workers: int | None = None,
              env: dict[str, str] | None = None, subdir: str | None = None,
              default_bind: bool = True) -> Daemon:
        tmp = root / (subdir or f"d{len(started)}")
        tmp.mkdir(exist_ok=True)
        extra = list(args)
        if workers is not None and "-w" not in extra:
            extra += ["-w", str(workers)]
        daemon = Daemon(tmp, extra, config, env, default_bind)
        started.append(daemon)
        if wait:
            daemon.wait_ready(workers=workers)
        return daemon

    return start


@pytest.fixture(scope="session")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The load generator's command: the C loadgen when it builds, else tests/pyload.py."""
    return build_loadgen(tmp_path_factory.mktemp("loadgen"))


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


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Wrapped]]:
    """spawn(*args, env=..., listen=SOCKET, own_pid=NAMES) -> a `lancelotd serve` started as systemd
    starts it (helpers.systemd.Wrapped), not waited for; killed and reaped at the end."""
    started: list[Wrapped] = []

    def start(*args: str, env: dict[str, str] | None = None, listen: socket.socket | None = None,
              own_pid: tuple[str, ...] = ()) -> Wrapped:
        tmp = tmp_path / f"w{len(started)}"
        tmp.mkdir()
        daemon = Wrapped(tmp, list(args), env or {}, listen, own_pid)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill_all()


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
    """A function of the tests' own (tests/, tests/helpers/), not of lancelotd or a library."""
    try:
        where = Path(inspect.getsourcefile(func) or "").resolve()
    except TypeError:
        return False
    return where.parent == TESTS or where.parent.parent == TESTS


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
