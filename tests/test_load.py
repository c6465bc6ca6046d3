"""Load behaviour of a real lancelotd: many idle and hostile connections, accept
wake-ups (the thundering herd) and how the accepting is shared by the workers.
"""

from __future__ import annotations

import re
import resource
import signal
import socket
import threading
import time

import pytest
from helpers import (
    COLOR_A,
    COLOR_Q,
    NAME_A,
    NAME_Q,
    held,
    recv_all,
    recv_until,
    scaled,
    sleeping_in,
    wait_for,
)

EXITING = re.compile(
    r"\[(\d+)\] worker (\d+): exiting: (\d+) connections accepted in (\d+) listener wake-ups \((\d+) empty\)"
)


@pytest.fixture
def many_fds():
    """Raise this process's soft RLIMIT_NOFILE to the hard limit for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def timed_ask(daemon, question: bytes = NAME_Q) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=scaled(5)) as sock:
        sock.sendall(question)
        answer = recv_until(sock, b".")
    return answer, time.perf_counter() - t0


def accept_stats(daemon) -> dict[int, tuple[int, int, int]]:
    """worker number -> (accepted, wake-ups, empty wake-ups) from the exit log lines."""
    stats: dict[int, tuple[int, int, int]] = {}
    for match in EXITING.finditer(daemon.log()):
        number, accepted, wakeups, empty = (int(g) for g in match.groups()[1:])
        assert number not in stats, f"worker {number} logged its exit twice"
        stats[number] = (accepted, wakeups, empty)
    return stats


def stop_and_collect(daemon, workers: int) -> dict[int, tuple[int, int, int]]:
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(15) == 0
    stats = accept_stats(daemon)
    assert sorted(stats) == list(range(1, workers + 1)), daemon.log()
    return stats


# --- many idle and slowloris connections -------------------------------------------------------

def test_fresh_client_answered_fast_among_2000_idle_and_500_slowloris(start_daemon, many_fds):
    idle_count, slow_count = 2000, 500
    if many_fds < idle_count + slow_count + 100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {many_fds} is too low for {idle_count + slow_count} sockets")
    daemon = start_daemon(workers=2, config="[protocol]\nidle_timeout = 60\n")
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    try:
        for _ in range(idle_count):
            idle.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=scaled(5)))
        for _ in range(slow_count):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=scaled(5))
            slow.append(sock)
            sock.sendall(b"What is")
        # every one of them accepted and held by a worker, not waiting in the backlog
        wait_for(lambda: sum(held(w.pid, daemon.port) for w in daemon.workers()) >= idle_count + slow_count,
                 20, "the workers to accept all connections")
        times = []
        for _ in range(5):
            answer, elapsed = timed_ask(daemon)
            assert answer == NAME_A
            times.append(elapsed)
        assert max(times) < scaled(0.1), f"fresh clients took {times}"
        # the slowloris connections were kept, not dropped: they can finish their question
        for sock in slow[:: slow_count // 10]:
            sock.sendall(b" your favorite color?")
            assert recv_until(sock, b".") == COLOR_A
        for sock in idle[:: idle_count // 10]:
            sock.sendall(NAME_Q)
            assert recv_until(sock, b".") == NAME_A
        assert daemon.proc.poll() is None and len(daemon.workers()) == 2
    finally:
        for sock in idle + slow:
            sock.close()


# --- accepting: wake-ups and sharing ----------------------------------------------------------

def waiting_in_epoll(pids: list[int]) -> bool:
    """Every one of these processes is asleep in epoll_wait (helpers.sleeping_in)."""
    return all(sleeping_in(pid, "epoll_wait") for pid in pids)


def test_idle_server_wakes_about_one_worker_per_connection(start_daemon):
    daemon = start_daemon(workers=2)
    workers = [w.pid for w in daemon.workers()]
    count = 200
    for _ in range(count):
        # An idle server: the connection arrives while every worker waits in epoll.
        # (A worker still busy with the last one would make the kernel wake another.)
        wait_for(lambda: waiting_in_epoll(workers), 5, "both workers idle in epoll_wait")
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=scaled(5)) as sock:
            sock.sendall(NAME_Q)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == NAME_A
    stats = stop_and_collect(daemon, 2)
    accepted = sum(s[0] for s in stats.values())
    wakeups = sum(s[1] for s in stats.values())
    assert accepted == count, stats
    assert wakeups / accepted <= 1.2, f"{wakeups} wake-ups for {accepted} connections: {stats}"


def test_connect_per_request_load_is_shared_by_both_workers(start_daemon):
    daemon = start_daemon(workers=2)
    threads, per_thread = 8, 400
    errors: list[str] = []
    done = [0] * threads

    def client(index: int) -> None:
        try:
            for _ in range(per_thread):
                with socket.create_connection(("127.0.0.1", daemon.port), timeout=scaled(5)) as sock:
                    sock.sendall(COLOR_Q)
                    answer = recv_until(sock, b".")
                if answer != COLOR_A:
                    errors.append(repr(answer))
                    return
                done[index] += 1
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(f"{type(e).__name__}: {e}")

    pool = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(scaled(60))
    assert not any(t.is_alive() for t in pool)
    assert not errors, errors[:5]
    total = threads * per_thread
    assert sum(done) == total
    stats = stop_and_collect(daemon, 2)
    assert sum(s[0] for s in stats.values()) == total, stats
    for number, (accepted, _wakeups, _empty) in stats.items():
        assert accepted > total * 0.10, f"worker {number} accepted only {accepted} of {total}: {stats}"
