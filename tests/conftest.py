"""Fixtures for the tests (the helpers they use are in helpers/, one definition each).

Every daemon runs in its own session (process group), so teardown can kill and reap the master
and every worker it forked, even when a test fails.

The whole session is a child subreaper: an orphan of our subtree (a USR2 successor, a `--daemon`
master, the workers of a SIGKILLed master) becomes our child, not PID 1's (which, on this
machine, reaps nobody).  After each test, any process that test started and left running is
killed, reaped and reported as an error of the test; see `no_leaked_processes`.
"""

from __future__ import annotations

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
