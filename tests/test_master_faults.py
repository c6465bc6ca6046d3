"""docs/PROMISES.md §6, the master's promise, with real daemons: no fault short of SIGKILL to the master ends
the service, and a fault in a lifecycle operation leaves the service as it was.

Each test provokes one fault that once took the master down (or would have), then checks that the
same master still supervises: it answers, replaces workers, and stops cleanly on TERM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import threading
from pathlib import Path

import psutil
import pytest
from helpers import (
    NAME_A,
    NAME_Q,
    CheckedThread,
    Daemon,
    held,
    lancelotd_cli,
    recv_until,
    scaled,
    status_json,
    wait_for,
    wait_log,
)

from lancelotd.scoreboard import SERVING, Scoreboard
from lancelotd.strays import STRAY
from lancelotd.strays import name as stray_name


def worker_pids(d: Daemon) -> set[int]:
    return {w.pid for w in d.workers()}


def wait_serving(d: Daemon, count: int) -> set[int]:
    """PIDs of `count` workers that have published SERVING (past their boot)."""
    board = Scoreboard.open(str(d.pid_file) + ".scoreboard")

    def serving() -> set[int] | None:
        pids = {slot.pid for _, slot in board.slots() if slot.state == SERVING}
        return pids if len(pids) == count else None
    try:
        return wait_for(serving, 10, f"{count} workers serving")  # type: ignore[return-value]
    finally:
        board.close()


def stops_cleanly(d: Daemon) -> None:
    """The master is still in charge: TERM ends it with 0, after its workers."""
    d.signal(signal.SIGTERM)
    assert d.wait_exit(15) == 0, d.log()[-3000:]
    assert "master stopped" in d.log()


class Askers:
    """Persistent clients asking in a loop on their own connections; every failure is recorded."""

    def __init__(self, port: int, count: int = 4) -> None:
        self.port, self.count = port, count
        self.failures: list[str] = []
        self.answered = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._ask, daemon=True) for _ in range(count)]
        for t in self.threads:
            t.start()

    def _ask(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=scaled(10)) as sock:
                while not self.stop.is_set():
                    sock.sendall(NAME_Q)
                    answer = recv_until(sock, b".")
                    if answer != NAME_A:
                        self.failures.append(f"answer {answer!r}")
                        return
                    self.answered += 1
        except BaseException as e:  # noqa: BLE001 - every kind of failure counts
            self.failures.append(repr(e))

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(scaled(10))
        assert not self.failures, self.failures


def test_no_stray_signal_ends_the_master_or_a_worker(start_daemon):
    """Every catchable signal whose default action would end a process, and that lancelotd gives no
    meaning (strays.py), sent to the master and to every worker under load: the master logs each
    once with its sender and goes on; the workers ignore them; no client notices."""
    d = start_daemon("-w", "2", workers=2)
    workers = wait_serving(d, 2)
    askers = Askers(d.port)
    wait_for(lambda: askers.answered > 100, 10, "the clients to be asking")
    for signum in sorted(STRAY):
        for pid in (d.proc.pid, *workers):
            os.kill(pid, signum)
    for signum in sorted(STRAY):
        wait_log(d.log_file, rf"ignored signal {re.escape(stray_name(signum))} from pid {os.getpid()}\b")
    before = askers.answered
    wait_for(lambda: askers.answered > before + 100, 10, "the clients to go on being answered")
    os.kill(d.proc.pid, signal.SIGALRM)  # again, within the minute: counted, not logged again
    os.kill(d.proc.pid, signal.SIGALRM)
    askers.finish()
    assert d.proc.poll() is None
    assert worker_pids(d) == workers, "a worker was replaced"
    assert len(re.findall(r"ignored signal SIGALRM ", d.log())) == 1
    assert "Traceback" not in d.log()
    stops_cleanly(d)


def test_an_exception_in_a_handler_is_logged_and_supervision_goes_on(start_daemon):
    d = start_daemon("-w", "1", workers=1, env={"LANCELOTD_TEST_FAULT_SIGNAL": "TTIN"})
    (first,) = worker_pids(d)
    d.signal(signal.SIGTTIN)
    wait_log(d.log_file, r"unexpected error handling TTIN; supervision goes on")
    assert "RuntimeError: injected fault in the TTIN handler" in d.log(), "the traceback is logged"
    os.kill(first, signal.SIGKILL)  # the master still supervises
    wait_for(lambda: len(worker_pids(d) - {first}) == 1, 5, "a replacement")
    assert d.ask(NAME_Q) == NAME_A
    stops_cleanly(d)


def test_log_file_that_cannot_be_reopened_on_usr1(start_daemon, tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    d = start_daemon("-w", "2", "--log-file", str(logdir / "lancelotd.log"), wait=False)
    wait_for(lambda: d.pid_file.exists() and (logdir / "lancelotd.log").exists(), 10, "the master")
    d.log_file = logdir / "lancelotd.log"
    d.wait_ready(workers=2)
    before = worker_pids(d)
    kept = tmp_path / "kept.log"
    os.link(logdir / "lancelotd.log", kept)  # the file the processes keep writing to
    shutil.rmtree(logdir)  # root ignores permissions: take the directory away instead
    d.signal(signal.SIGUSR1)
    d.log_file = kept
    wait_log(d.log_file, r"master: cannot reopen log file .*; still logging to the file already open")
    wait_log(d.log_file, r"worker \d: cannot reopen log file", count=2)
    assert d.ask(NAME_Q) == NAME_A
    assert worker_pids(d) == before, "no worker died of it"
    assert d.proc.poll() is None
    logdir.mkdir()  # so the master's last lines can be written where it expects them
    stops_cleanly(d)


def test_max_requests_with_connect_per_request_clients_during_reloads(start_daemon):
    """Workers that recycle themselves while a reload runs are recycled, not crashes, and
    never abort the reload."""
    conf = "[server]\nworkers = 2\n[lifecycle]\nmax_requests = 20\nmax_requests_jitter = 5\n"
    d = start_daemon(config=conf, workers=2)
    stop = threading.Event()
    failures: list[str] = []

    def ask_in_a_loop() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(5)) as sock:
                    sock.sendall(NAME_Q)
                    if recv_until(sock, b".") != NAME_A:
                        failures.append("wrong answer")
            except Exception as e:  # noqa: BLE001 - a dropped connection (EOFError) fails the test too
                failures.append(repr(e))

    clients = [CheckedThread(ask_in_a_loop) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        for round_ in range(1, 6):
            wait_log(d.log_file, r"recycled after max_requests", count=round_, timeout=15)
            reload = lancelotd_cli("reload", "--pid-file", str(d.pid_file), timeout=60)
            assert reload.returncode == 0, reload.stderr + d.log()[-3000:]
    finally:
        stop.set()
        for client in clients:
            client.finish()
    log = d.log()
    assert failures == []
    assert "recycled after max_requests" in log
    assert "reload failed" not in log and "unexpectedly" not in log and "during boot" not in log, log[-3000:]
    replaced = status_json(d.pid_file)["replaced"]
    assert replaced["crashed"] == 0, replaced
    stops_cleanly(d)


def test_term_closes_the_masters_listeners_first(start_daemon):
    """Once TERM arrives, only the workers hold the listening socket; when they are gone, a new
    connection is refused at once instead of queuing where no one will accept it."""
    d = start_daemon("-w", "1", "--log-file", "", workers=1)
    master = psutil.Process(d.proc.pid)

    assert held(master.pid, d.port, psutil.CONN_LISTEN) == 1
    with d.connect() as holder:  # keeps the worker (and so the stop) going
        holder.sendall(NAME_Q)
        assert recv_until(holder, b".") == NAME_A
        d.signal(signal.SIGTERM)
        wait_for(lambda: not held(master.pid, d.port, psutil.CONN_LISTEN), 5,
                 "the master to close its listener")
    assert d.wait_exit(15) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", d.port), timeout=scaled(2))


def test_a_killed_workers_handoff_inbox_is_removed(start_daemon):
    """A worker killed by a signal cannot remove its hand-off inbox: the master does, once it has
    reaped it, so the PID file's directory does not fill with dead sockets."""
    d = start_daemon("-w", "2", workers=2)
    victim = min(wait_serving(d, 2))
    inbox = Path(f"{d.pid_file}.handoff-{victim}")
    assert inbox.exists()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(worker_pids(d) - {victim}) == 2, 5, "a replacement")
    wait_for(lambda: not inbox.exists(), 5, "the dead worker's inbox to be removed")
    stops_cleanly(d)
    assert not list(d.pid_file.parent.glob("*.handoff-*")), "every worker removed its own at exit"


def test_a_reload_that_moves_the_drain_file_is_refused(start_daemon, tmp_path):
    """Every other process finds the daemon through its files: half a move would lose them.
    (pid_file takes the same path in generations.FIXED_AT_START; the harness fixes it with
    --pid-file, which overrides the file.)"""
    d = start_daemon(config="[server]\nworkers = 1\n", workers=1)
    (first,) = worker_pids(d)
    d.config_file.write_text(f'[server]\nworkers = 1\n[balancer]\ndrain_file = "{tmp_path / "elsewhere"}"\n')
    result = lancelotd_cli("reload", "--pid-file", str(d.pid_file), "-c", str(d.config_file))
    assert result.returncode != 0, result.stdout + result.stderr
    assert "drain_file changed: restart to apply" in result.stdout + result.stderr
    wait_log(d.log_file, r"reload refused: drain_file changed: restart to apply")
    assert worker_pids(d) == {first}
    assert d.ask(NAME_Q) == NAME_A
    stops_cleanly(d)


def test_a_worker_whose_master_is_gone_retires_and_removes_its_inbox(start_daemon):
    d = start_daemon("-w", "1", workers=1)
    (worker,) = wait_serving(d, 1)  # its inbox is made before it serves, not when it is forked
    inbox = Path(f"{d.pid_file}.handoff-{worker}")
    assert inbox.exists()
    with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(10)) as held:
        held.sendall(NAME_Q)
        assert recv_until(held, b".") == NAME_A
        d.signal(signal.SIGKILL)
        d.wait_exit(5)
        wait_log(d.log_file, rf"\[{worker}\] worker 1: master {d.proc.pid} is gone: retiring")
        assert not inbox.exists(), "the inbox of a retiring worker is removed"
        held.sendall(NAME_Q)  # still served while it drains (graceful_timeout)
        assert recv_until(held, b".") == NAME_A
    wait_for(lambda: not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE,
             10, "the worker to exit once its client has left")
