"""Issue 6: a retired worker hands its open connections to a current worker (SCM_RIGHTS).

Real daemons, real TCP on loopback, real signals.  What a client must see when the worker
holding its connection is retired (HUP reload, TTOU, max_requests recycling, USR2 upgrade):
no close, no reset, no lost or duplicated answer, and from its next question on the answers
of the current config.  The retired worker exits as soon as it has handed everything over;
when no current worker can take a connection (all at max_connections) it keeps serving it
and drains as before.  Connections are spread over the current workers, least loaded first.

The client under test is a `Client`: one persistent connection, a question every few ms,
every answer checked (it must be one of the expected answers, and answers never go back to
an older config).  Waits are on readiness signals - a log line, a PID gone, psutil's view
of who holds a socket, the scoreboard (`lancelotd status --json`, published once per worker
tick) - never fixed sleeps, except the pacing of the HUP storm, which is the load pattern.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from helpers import (
    BLUE,
    GRACE,
    GREEN,
    LISTENING,
    NAME_A,
    NAME_Q,
    Client,
    Daemon,
    ExactlyOnce,
    clean_env,
    gone,
    handed,
    handoff_conf,
    held,
    holder_of,
    live_children,
    read,
    read_pid,
    reap_group,
    recv_until,
    rewrite,
    scaled,
    server_rx_queue,
    status_json,
    wait_child_exit,
    wait_for,
    wait_log,
    wait_pool,
    workers_of,
)
from loadgen import assert_no_errors, load

from lancelotd.rendezvous import Rendezvous
from lancelotd.scoreboard import SERVING, Scoreboard

COLOR_Q = b"Color?"


# --- the client under test -------------------------------------------------------


# --- who holds what ----------------------------------------------------------------

def wait_tick(board: Scoreboard, pid: int) -> None:
    """Wait for the next loop tick of worker `pid` (its heartbeat on the scoreboard moves), or its exit."""
    def heartbeat() -> float:
        return next((slot.heartbeat for _, slot in board.slots() if slot.pid == pid), 0.0)
    seen = heartbeat()
    wait_for(lambda: heartbeat() > seen or gone(pid), 5, f"a tick of worker {pid}")


def hups_handled(log: str) -> int:
    """How many HUPs the master has acted on: each one logs "reloading" or, while a reload is
    under way, "queued"; a queued reload, run once the one under way is done, logs one more
    "reloading" that answers no new HUP."""
    count, queued, queued_run_next = 0, False, False
    for kind in re.findall(r"master: (reloading|reload requested|reload done|reload failed|reload refused)",
                           log):
        if kind == "reload requested":
            count += 1
            queued = True
        elif kind == "reloading":
            if queued_run_next:
                queued_run_next = False
            else:
                count += 1
        elif kind in ("reload done", "reload failed"):
            queued_run_next, queued = queued, False
    return count


def reloads_under_way(log: str) -> bool:
    started = len(re.findall(r"master: reloading ", log))
    ended = len(re.findall(r"master: (?:reload done|reload failed|reload refused)", log))
    return started != ended


@contextmanager
def only_accepting(keep: int, pool: dict[int, tuple[int, int]]) -> Iterator[None]:
    """SIGSTOP every worker of `pool` but `keep`, so that `keep` accepts the connections made here.

    (A stopped process is off the listener's wait queue only once it has actually stopped.)
    """
    others = [pid for pid in pool if pid != keep]
    try:
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        for pid in others:
            wait_for(lambda pid=pid: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 5,
                     f"worker {pid} stopped")
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def connect_to(d: Daemon, pid: int, pool: dict[int, tuple[int, int]], count: int = 1) -> list[socket.socket]:
    """`count` connections, each answered once, all accepted by worker `pid`."""
    socks = []
    with only_accepting(pid, pool):
        for _ in range(count):
            sock = d.connect()
            socks.append(sock)
            sock.sendall(COLOR_Q)
            recv_until(sock, b".")
    assert all(holder_of(s, list(pool)) == pid for s in socks)
    return socks


# =================================================================================
# (a) HUP: a persistent client switches to the new answers within a second
# =================================================================================

def test_hup_hands_a_persistent_connection_over(start_daemon):
    d = start_daemon(config=handoff_conf(workers=2, color="Blue."))
    master = d.proc.pid
    gen1 = wait_pool(master, 2, generation=1)
    sock = d.connect()
    with sock, Client(sock, [BLUE, GREEN]) as client:
        old = holder_of(sock, list(gen1))
        assert old is not None
        rewrite(d, handoff_conf(workers=2, color="Green."))
        hup = time.monotonic()
        d.signal(signal.SIGHUP)
        wait_for(lambda: client.first(GREEN), 5, "the first answer from the new config")
        switched = client.first(GREEN) - hup
        # The old generation leaves as soon as it has handed over (not after graceful_timeout).
        gen2 = wait_pool(master, 2, generation=2, timeout=5)
        client.wait_more(20)
        new = holder_of(sock, list(gen2))
    client.check()
    assert switched < scaled(1.0), f"the new answer came {switched:.3f}s after HUP"
    assert new in gen2, "the connection is not held by a generation-2 worker"
    assert handed(d.log()).get(old) == [(1, 0)], d.log()[-3000:]
    assert gone(old)


# =================================================================================
# (b) a question split across the hand-off is answered with the new config
# =================================================================================

@pytest.mark.parametrize("split", [1, 5], ids=["C|olor?", "Color|?"])
def test_question_split_across_the_hand_off(start_daemon, split):
    d = start_daemon(config=handoff_conf(workers=2, color="Blue."))
    gen1 = wait_pool(d.proc.pid, 2, generation=1)
    with d.connect() as sock:
        # A whole question and the first part of the next in one segment: once the answer to
        # the first is back, the worker has read the part too (it holds it as unfinished).
        sock.sendall(NAME_Q + COLOR_Q[:split])
        assert recv_until(sock, b".") == NAME_A
        wait_for(lambda: server_rx_queue(sock) == 0, 5, "the server to read every byte sent")
        old = holder_of(sock, list(gen1))
        assert old is not None

        rewrite(d, handoff_conf(workers=2, color="Green."))
        d.signal(signal.SIGHUP)
        wait_log(d.log_file, rf"\[{old}\] worker \d+: handed 1 connections over \(0 left\)", timeout=5)
        wait_for(lambda: gone(old), 5, "the old worker to exit")

        sock.sendall(COLOR_Q[split:])
        assert recv_until(sock, b".") == GREEN  # "No idea." if the first part was lost
        sock.sendall(COLOR_Q)
        assert recv_until(sock, b".") == GREEN
        assert holder_of(sock, list(wait_pool(d.proc.pid, 2, generation=2))) is not None


# =================================================================================
# (c) the same for TTOU, max_requests recycling and a USR2 upgrade
# =================================================================================

def test_ttou_hands_the_retired_workers_connection_over(start_daemon):
    d = start_daemon(config=handoff_conf(workers=3))
    master = d.proc.pid
    pool = wait_pool(master, 3, generation=1)
    by_number = {number: pid for pid, (number, _) in pool.items()}
    third = by_number[3]
    (sock,) = connect_to(d, third, pool)  # TTOU retires the highest numbered worker
    with sock, Client(sock, [BLUE]) as client:
        d.signal(signal.SIGTTOU)
        wait_log(d.log_file, r"TTOU: 2 workers")
        wait_for(lambda: gone(third), 3, "worker 3 to exit once it has handed its connection over")
        client.wait_more(20)
        holder = holder_of(sock, [by_number[1], by_number[2]])
    client.check()
    assert holder is not None, "the connection is not held by worker 1 or 2"
    assert handed(d.log()).get(third) == [(1, 0)], d.log()[-3000:]
    assert set(wait_pool(master, 2, generation=1)) == {by_number[1], by_number[2]}


def test_max_requests_recycling_hands_the_connection_over(start_daemon):
    d = start_daemon(config=handoff_conf(workers=1, lifecycle="max_requests = 100"))
    master = d.proc.pid
    (first,) = wait_pool(master, 1, generation=1)
    sock = d.connect()
    with sock, Client(sock, [BLUE], pause=0.002) as client:
        # The client alone drives the recycling: ~100 answers, retire, hand over, again.
        wait_for(lambda: len(re.findall(r"recycled after max_requests", d.log())) >= 3, 20,
                 "three recyclings")
        client.wait_more(20)
        # (Recycled every ~0.3 s: a worker spawned after a look at the children may hold it.)
        holder = wait_for(lambda: holder_of(sock, [p.pid for p in live_children(master) or []]), 5,
                          "a worker holding the connection")
    client.check()
    hand_offs = handed(d.log())
    assert len(hand_offs) >= 2, d.log()[-3000:]
    assert all(lines[-1][1] == 0 for lines in hand_offs.values()), hand_offs
    assert first in hand_offs and gone(first)
    assert holder is not None and holder != first
    # Each recycled worker left once its connection was handed over, not after graceful_timeout.
    recycled = [int(pid) for pid in re.findall(r"\[(\d+)\] worker \d+: served \d+ questions", d.log())]
    wait_for(lambda: all(gone(pid) for pid in recycled), 3, "every recycled worker to exit")


def test_usr2_hands_connections_to_the_new_masters_workers(start_daemon):
    d = start_daemon(config=handoff_conf(workers=2, color="Blue."))
    old_master = d.proc.pid
    old_workers = wait_pool(old_master, 2, generation=1)
    sock = d.connect()
    with sock, Client(sock, [BLUE, GREEN]) as client:
        old = holder_of(sock, list(old_workers))
        assert old is not None
        rewrite(d, handoff_conf(workers=2, color="Green."))  # the new master reads the file again
        usr2 = time.monotonic()
        d.signal(signal.SIGUSR2)
        new_master = wait_for(lambda: (read_pid(d.pid_file) or old_master) != old_master
                              and read_pid(d.pid_file), 10, "the new master's PID in the PID file")
        wait_for(lambda: client.first(GREEN), 10, "the first answer from the new master's workers")
        switched = client.first(GREEN) - usr2
        # The old master exits once its workers have handed everything over, while the
        # client keeps being answered.
        assert d.wait_exit(5) == 0
        client.wait_more(20)
        new_workers = wait_pool(new_master, 2, generation=1)
        serving = holder_of(sock, list(new_workers))
    client.check()
    assert serving is not None, "the connection is not held by the new master's workers"
    assert psutil.Process(serving).ppid() == new_master != old_master
    assert handed(d.log()).get(old) == [(1, 0)], d.log()[-3000:]
    assert switched < scaled(5.0), f"the new answer came {switched:.3f}s after USR2"
    assert not Path(str(d.pid_file) + ".oldbin").exists()
    os.kill(new_master, signal.SIGTERM)
    assert wait_child_exit(new_master, 10) == 0


# =================================================================================
# (d) the storm: 40 HUPs at 5 per second under persistent clients
# =================================================================================

def test_hup_storm_with_persistent_clients(start_daemon, loadgen):
    workers, hups = 2, 40
    colors = [f"Color{i}.".encode() for i in range(hups + 1)]
    d = start_daemon(config=handoff_conf(workers=workers, color=colors[0].decode()))
    master = d.proc.pid
    wait_pool(master, workers, generation=1)
    socks = [d.connect() for _ in range(4)]
    clients = [Client(s, colors, pause=0.005, name=f"client {i}") for i, s in enumerate(socks)]
    with load(loadgen, d.port, conns=10, seconds=hups * 0.2 + 1.5) as result:
        for c in clients:
            c.__enter__()
        try:
            for i in range(1, hups + 1):
                rewrite(d, handoff_conf(workers=workers, color=colors[i].decode()))
                d.signal(signal.SIGHUP)
                last_hup = time.monotonic()
                if i < hups:
                    time.sleep(0.2)  # the load pattern: 5 HUPs a second

            def back_to_workers() -> bool:
                assert not any(c.errors for c in clients), [c.errors for c in clients]
                log = d.log()
                if hups_handled(log) < hups or reloads_under_way(log):
                    return False
                try:  # zombies count: a process not reaped yet is still there
                    return len(psutil.Process(master).children()) == workers
                except psutil.Error:
                    return False
            wait_for(back_to_workers, 10, f"every HUP handled and the master's children back to {workers}")
            settled = time.monotonic() - last_hup
            # Every client is on the last generation.
            for c in clients:
                wait_for(lambda c=c: c.last == colors[-1], 5, f"{c.name} to get the last config's answer")
        finally:
            for c in clients:
                c.__exit__()
            for s in socks:
                s.close()
    for c in clients:
        c.check()
    assert_no_errors(result)
    log = d.log()
    assert len(re.findall(r"master: reloading ", log)) == len(re.findall(r"master: reload done", log)), \
        log[-3000:]
    assert not re.findall(r"^.* (?:WARNING|ERROR|CRITICAL) .*$", log, re.M)
    assert settled < scaled(2.0), f"the master had {workers} children only {settled:.2f}s after the last HUP"


# =================================================================================
# (e) fair spread: the connections of one retiring worker go to all current workers
# =================================================================================

def test_connections_are_spread_over_the_new_generation(start_daemon):
    count = 40
    d = start_daemon(config=handoff_conf(workers=4, color="Blue."))
    master = d.proc.pid
    pool = wait_pool(master, 4, generation=1)
    fourth = next(pid for pid, (number, _) in pool.items() if number == 4)
    socks = connect_to(d, fourth, pool, count)  # every connection on worker 4
    try:
        rewrite(d, handoff_conf(workers=4, color="Green."))
        d.signal(signal.SIGHUP)
        gen2 = wait_pool(master, 4, generation=2, timeout=5)  # generation 1 handed all and left
        lines = handed(d.log()).get(fourth, [])
        assert sum(n for n, _ in lines) == count and lines[-1][1] == 0, d.log()[-3000:]

        def published() -> dict[int, int] | None:  # workers publish once per tick (~1 s)
            workers = status_json(d.pid_file)["workers"]
            shares = {w["pid"]: w["connections"] for w in workers if w["generation"] == 2}
            return shares if sum(shares.values()) == count else None
        shares = wait_for(published, 10, f"the scoreboard to show {count} connections in generation 2")
        for s in socks:
            s.sendall(COLOR_Q)
            assert recv_until(s, b".") == GREEN
    finally:
        for s in socks:
            s.close()
    assert set(shares) == set(gen2)
    assert all(shares.values()), f"a new worker got no connection: {shares}"
    assert max(shares.values()) <= 0.6 * count, f"one worker got more than 60%: {shares}"


# =================================================================================
# (f) fallback: when no current worker can take a connection, the old one keeps it
# =================================================================================

def test_ttou_fallback_when_the_others_are_full(start_daemon):
    """One sender, one config: workers 1 and 2 are at max_connections, so retired worker 3
    keeps serving its clients (draining), and hands them over one by one as room appears."""
    d = start_daemon(config=handoff_conf(workers=3, max_connections=2))
    master = d.proc.pid
    pool = wait_pool(master, 3, generation=1)
    by_number = {number: pid for pid, (number, _) in pool.items()}
    third = by_number[3]
    on_third = connect_to(d, third, pool, 2)  # worker 3 is full now and accepts no more
    others = []
    for _ in range(4):
        sock = d.connect()
        sock.sendall(COLOR_Q)
        assert recv_until(sock, b".") == BLUE
        others.append(sock)
    holders = {s: holder_of(s, list(pool)) for s in others}
    assert Counter(holders.values()) == {by_number[1]: 2, by_number[2]: 2}
    board = Scoreboard.open(str(d.pid_file) + ".scoreboard")
    clients = [Client(s, [BLUE], name=f"client {i}") for i, s in enumerate(on_third + others)]
    try:
        for c in clients:
            c.__enter__()

        def published(pid: int, connections: int) -> bool:
            return any(slot.pid == pid and slot.connections == connections for _, slot in board.slots())
        wait_for(lambda: all(published(by_number[n], 2) for n in (1, 2, 3)), 5,
                 "every worker's 2 connections on the scoreboard")

        d.signal(signal.SIGTTOU)
        wait_log(d.log_file, r"TTOU: 2 workers")

        # Two ticks of worker 3 (each one a hand-off attempt): still there, still serving.
        for _ in range(2):
            wait_tick(board, third)
        for c in clients:
            c.wait_more(5)
        assert not gone(third)
        assert all(holder_of(s, list(pool)) == third for s in on_third)
        assert third not in handed(d.log()), d.log()[-3000:]

        # Room for one on worker 1: one connection moves; room on worker 2: the last one moves,
        # and worker 3 leaves.  Never more than a target has room for.
        for step, number in enumerate((1, 2), start=1):
            leaving = next(s for s in others if holders[s] == by_number[number])
            clients[2 + others.index(leaving)].__exit__()
            leaving.close()
            wait_for(lambda step=step: len(handed(d.log()).get(third, [])) >= step, 5,
                     f"hand-off number {step} from worker 3")
            lines = handed(d.log())[third]
            assert lines == [(1, 2 - i) for i in range(1, step + 1)], (
                f"worker 3 handed {lines} (connections, left) with room for one on worker {number}; "
                f"workers 1 and 2 now hold {held(by_number[1], d.port)} and {held(by_number[2], d.port)} "
                f"connections (max_connections = 2)")
        wait_for(lambda: gone(third), 3, "worker 3 to exit once it has handed everything over")
        for c in clients[:2]:
            c.wait_more(10)
        for s in on_third:
            assert holder_of(s, [by_number[1], by_number[2]]) is not None
    finally:
        for c in clients:
            c.__exit__()
        board.close()
        for s in on_third + others:
            s.close()
    for c in clients:
        c.check()


@pytest.mark.parametrize("old_limit,old_workers,held_per_worker", [(2, 2, 2), (0, 1, 4)],
                         ids=["same-limit-two-senders", "limit-lowered-one-sender"])
def test_hup_fallback_when_the_new_generation_is_full(start_daemon, old_limit, old_workers, held_per_worker):
    """More connections than the new generation may hold (max_connections = 2, one new worker):
    it takes what it may, the old workers keep serving the rest (draining), nothing is dropped.

    same-limit-two-senders: both configs say 2; two old workers with 2 connections each.
    limit-lowered-one-sender: the old config has no limit, one old worker holds 4; the new says 2.
    """
    limit = 2
    d = start_daemon(config=handoff_conf(workers=old_workers, max_connections=old_limit or None))
    master = d.proc.pid
    gen1 = wait_pool(master, old_workers, generation=1)
    socks = []
    for pid in gen1:
        socks += connect_to(d, pid, gen1, held_per_worker) if old_workers > 1 else \
            [d.connect() for _ in range(held_per_worker)]
    for s in socks:
        s.sendall(COLOR_Q)
        assert recv_until(s, b".") == BLUE
    total = len(socks)
    assert sum(held(pid, d.port) for pid in gen1) == total
    clients = [Client(s, [BLUE, GREEN], name=f"client {i}") for i, s in enumerate(socks)]
    board = Scoreboard.open(str(d.pid_file) + ".scoreboard")
    try:
        for c in clients:
            c.__enter__()
        rewrite(d, handoff_conf(workers=1, color="Green.", max_connections=limit))
        d.signal(signal.SIGHUP)
        wait_log(d.log_file, r"reload done: generation 2")
        (new,) = wait_for(lambda: [pid for pid, (_, g) in workers_of(master).items() if g == 2], 5,
                          "the generation-2 worker")

        # The new worker fills up to its limit; then every client is answered, by whoever holds it.
        wait_for(lambda: sum(c.last == GREEN for c in clients) >= limit, 5,
                 f"{limit} clients answered by the new worker")
        most = held(new, d.port)
        for pid in [new, *gen1]:  # a tick (a publish, a hand-off attempt) of every worker
            wait_tick(board, pid)
            most = max(most, held(new, d.port))
        for c in clients:
            c.wait_more(5)
        most = max(most, held(new, d.port))
        # A full target sends a connection back to its sender, which logs it.
        moved = sum(n for lines in handed(d.log()).values() for n, _ in lines) - d.log().count("came back")
        draining = [w for w in status_json(d.pid_file)["workers"] if w["generation"] == 1]
        green = sum(c.last == GREEN for c in clients)
    finally:
        for c in clients:
            c.__exit__()
        board.close()
        for s in socks:
            s.close()
    for c in clients:
        c.check()  # nothing dropped: no EOF, no reset, no wrong answer
    assert most <= limit, (f"the new worker holds {most} connections, over its max_connections = {limit}; "
                           f"hand-off lines: {handed(d.log())}")
    assert moved == limit < total, f"handed {moved} of {total}: {handed(d.log())}"
    assert green == limit
    assert draining and all(w["state"] == "draining" for w in draining), draining


# =================================================================================
# (g) two phases: a connection in flight is never lost (issue 10)
# =================================================================================

def stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def free_fds(pid: int, count: int) -> list[int]:
    """The `count` lowest descriptor numbers process `pid` does not use (the next it will get)."""
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    free = []
    fd = 0
    while len(free) < count:
        if fd not in used:
            free.append(fd)
        fd += 1
    return free


def retire_worker_3(d: Daemon) -> tuple[int, list[int], socket.socket, ExactlyOnce]:
    """Three workers; a client on worker 3, asking all the time; TTOU retires worker 3."""
    master = d.proc.pid
    pool = wait_pool(master, 3, generation=1)
    by_number = {number: pid for pid, (number, _) in pool.items()}
    (sock,) = connect_to(d, by_number[3], pool)
    client = ExactlyOnce(sock)
    client.__enter__()
    return by_number[3], [by_number[1], by_number[2]], sock, client


def settle_on_current_workers(d: Daemon, third: int, sock: socket.socket, client: ExactlyOnce) -> None:
    """Worker 3 leaves once a current worker has adopted the client, which is answered throughout."""
    wait_for(lambda: gone(third) or client.errors, 20, "worker 3 to hand the client over and exit")
    client.wait_more(20, timeout=10)
    current = [pid for pid, (_, generation) in workers_of(d.proc.pid).items() if generation == 1]
    holder = holder_of(sock, current)
    client.__exit__()
    sock.close()
    client.check()
    assert gone(third)
    assert holder is not None and holder != third, d.log()[-3000:]
    assert handed(d.log()).get(third, [])[-1:] == [(1, 0)], d.log()[-3000:]


@pytest.mark.parametrize("fault", ["retires", "killed"])
def test_target_retires_or_dies_with_a_connection_in_flight(start_daemon, fault):
    """The targets are stopped (SIGSTOP) while worker 3 hands its client over, so the socket
    is in flight, queued on the target's inbox or channel; then the target retires (USR2) or
    is killed (SIGKILL) before it reads it.  Worker 3 takes the connection back (refusal, or
    the channel closing) and hands it over later to a worker that adopts it."""
    d = start_daemon(config=handoff_conf(workers=3))
    third, targets, sock, client = retire_worker_3(d)
    try:
        for pid in targets:
            os.kill(pid, signal.SIGSTOP)
        for pid in targets:
            wait_for(lambda pid=pid: stopped(pid), 5, f"worker {pid} stopped")
        d.signal(signal.SIGTTOU)
        wait_log(d.log_file, rf"\[{third}\] worker 3: handed 1 connections over \(0 left\)", timeout=5)
        for pid in targets:
            os.kill(pid, signal.SIGUSR2 if fault == "retires" else signal.SIGKILL)
        if fault == "retires":
            for pid in targets:
                os.kill(pid, signal.SIGCONT)
        client.wait_more(20, timeout=15)
        # A refusal, or the channel closing: either way worker 3 served the client again.
        wait_log(d.log_file, rf"\[{third}\] worker 3: .*(?:came back|is gone with 1 connections in flight)",
                 timeout=5)
        settle_on_current_workers(d, third, sock, client)
    finally:
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        client.__exit__()
        sock.close()
    assert all(gone(pid) for pid in targets)


@pytest.mark.parametrize("where", ["recvmsg", "accept"])
def test_target_at_its_descriptor_limit(start_daemon, where):
    """Workers 1 and 2 are at their descriptor limit (RLIMIT_NOFILE lowered on the running
    process): room for the channel but not the client's socket (recvmsg: MSG_CTRUNC, the
    target refuses), or no room for the channel either (accept: EMFILE, no answer; worker 3
    takes the connection back after the deadline).  The client stays with worker 3 until the
    limit is lifted, then moves."""
    d = start_daemon(config=handoff_conf(workers=3))
    third, targets, sock, client = retire_worker_3(d)
    limits = {pid: resource.prlimit(pid, resource.RLIMIT_NOFILE) for pid in targets}
    try:
        for pid in targets:
            first, second = free_fds(pid, 2)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (second if where == "recvmsg" else first,
                                                          limits[pid][1]))
        d.signal(signal.SIGTTOU)
        wait_log(d.log_file, rf"\[{third}\] worker 3: handed 1 connections over", timeout=5)
        client.wait_more(20, timeout=10)
        if where == "recvmsg":
            wait_log(d.log_file, r"refused a connection from worker \d+: out of descriptors", timeout=5)
        else:
            wait_log(d.log_file, r"cannot accept a hand-off channel \(Too many open files\)", timeout=5)
        wait_log(d.log_file, rf"\[{third}\] worker 3: .*(?:came back|did not answer).*serving",
                 timeout=10)
        assert holder_of(sock, [third, *targets]) == third
        for pid in targets:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits[pid])
        settle_on_current_workers(d, third, sock, client)
    finally:
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(pid, resource.RLIMIT_NOFILE, limits[pid])
        client.__exit__()
        sock.close()
    log = d.log()
    assert not re.search(r"Traceback|exited with code [1-9]|killed by", log), log[-3000:]


def test_aborted_reload_hands_the_new_generations_clients_back(start_daemon):
    """A reload whose worker 2 fails at boot (after 3 s) is aborted; worker 1 of the new
    generation had already accepted a client: it is retired, not stopped, so the client's
    connection moves to the old generation and keeps being answered."""
    boot = scaled(3)
    d = start_daemon(config=handoff_conf(workers=2), env={"LANCELOTD_TEST_FAIL_BOOT": "2:2",
                                                  "LANCELOTD_TEST_BOOT_DELAY": f"{boot}@2:2"})
    master = d.proc.pid
    gen1 = wait_pool(master, 2, generation=1)
    board = Scoreboard.open(str(d.pid_file) + ".scoreboard")
    try:
        d.signal(signal.SIGHUP)

        def new_worker_1() -> int | None:
            return next((slot.pid for _, slot in board.slots()
                         if slot.generation == 2 and slot.number == 1 and slot.state == SERVING), None)
        new = wait_for(new_worker_1, 5, "worker 1 of generation 2 serving")
    finally:
        board.close()
    (sock,) = connect_to(d, new, {**gen1, new: (1, 2)})
    with sock, ExactlyOnce(sock) as client:
        wait_log(d.log_file, r"reload failed: ", timeout=10)
        wait_for(lambda: gone(new), 5, "the new worker to hand its client over and exit")
        client.wait_more(20)
        holder = holder_of(sock, list(gen1))
    client.check()
    assert holder in gen1, d.log()[-3000:]
    assert handed(d.log()).get(new) == [(1, 0)], d.log()[-3000:]
    assert set(wait_pool(master, 2)) == set(gen1)


# =================================================================================
# (h) the rendezvous: names in our own directory, nobody else's to take
# =================================================================================

CLONE_NEWNET = 0x40000000


def private_namespaces_or_skip() -> None:
    """The squat test runs in a PID and network namespace of its own: root and unshare(1)."""
    if os.geteuid() != 0 or not all(map(shutil.which, ("unshare", "nsenter", "ip"))):
        pytest.skip("needs root, unshare(1), nsenter(1) and ip(8): the names it squats (1000 abstract "
                    "sockets, named after the next PIDs) must be in namespaces of its own, not the host's")
    probe = subprocess.run(["unshare", "--pid", "--net", "--fork", "--mount-proc", "ip", "link", "set", "lo",
                            "up"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=scaled(30))
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID and network namespace here: {probe.stderr.strip()}")


@contextmanager
def in_netns_of(pid: int) -> Iterator[None]:
    """This thread in the network namespace of process `pid`: the sockets made meanwhile (ours,
    a sock_diag query) live there.  setns(2) moves the calling thread only, and it comes back."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    theirs = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(theirs, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into the network namespace of {pid}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back into our own network namespace")
    finally:
        os.close(own)
        os.close(theirs)


def ns_pid(pid: int) -> int:
    """The PID of host process `pid` in its own (innermost) PID namespace."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid line for {pid}")


@pytest.mark.parametrize("squat", ["socket", "directory"])
def test_squatted_rendezvous_names_do_not_stop_workers(tmp_path, squat):
    """Before a reload, the names the next workers will use are taken: the old abstract names
    (bound, as another user could) and the file names beside the PID file (a stale socket a dead
    worker left, or a directory).  The new workers boot all the same; over a stale socket they
    bind their own and receive the old generation's client.

    The daemon runs in a PID and network namespace of its own, where nothing else forks: the
    next 1000 PIDs there are certain, not guessed, and the 1000 abstract names squatted there
    are nobody else's (in the host's namespace they could be a real lancelotd's workers')."""
    private_namespaces_or_skip()
    config, pid_file, log = (tmp_path / name for name in ("lancelotd.toml", "lancelotd.pid", "lancelotd.log"))
    config.write_text(handoff_conf(workers=1))
    cmd = ["unshare", "--pid", "--net", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
           'ip link set lo up && exec "$@"', "sh", sys.executable, "-m", "lancelotd", "serve",
           "-b", "127.0.0.1:0", "--pid-file", str(pid_file), "-c", str(config)]
    with open(log, "ab") as out:
        outer = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True, env=clean_env())
    squatters: list[socket.socket] = []
    try:
        def the_master() -> int | None:
            assert outer.poll() is None, f"unshare exited with {outer.returncode}:\n{read(log)}"
            children = live_children(outer.pid)
            return children[0].pid if children and LISTENING.search(read(log)) and pid_file.exists() else None
        master = wait_for(the_master, 15, "the master, PID 1 of its namespace")
        port = int(LISTENING.search(read(log)).group(2))
        (old,) = wait_pool(master, 1, generation=1)
        # Nothing else forks in the namespace: its next PIDs follow its last one, which only a
        # process in it can read (ns_last_pid is the reader's namespace's).
        last = int(subprocess.run(["nsenter", "--target", str(master), "--pid", "cat",
                                   "/proc/sys/kernel/ns_last_pid"], capture_output=True, text=True,
                                  check=True, timeout=scaled(30)).stdout)
        pids = list(range(last + 1, last + 1001))
        with in_netns_of(master):
            for pid in pids:
                abstract = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                squatters.append(abstract)
                abstract.bind(f"\0lancelotd-handoff-{pid}")
                abstract.listen(1)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as late, \
                    pytest.raises(OSError, match="in use"):  # the daemon's namespace holds them
                late.bind(f"\0lancelotd-handoff-{pids[-1]}")
            sock = socket.create_connection(("127.0.0.1", port), timeout=scaled(5))
        for pid in pids:
            name = f"{pid_file}.handoff-{pid}"
            if squat == "directory":
                os.mkdir(name)
            else:
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as stale:
                    stale.bind(name)
        with sock, ExactlyOnce(sock) as client:
            config.write_text(handoff_conf(workers=2))
            os.kill(master, signal.SIGHUP)
            wait_log(log, r"reload done: generation 2", timeout=10)
            gen2 = wait_pool(master, 2, generation=2, timeout=5) if squat == "socket" else \
                {pid: v for pid, v in workers_of(master).items() if v[1] == 2}
            client.wait_more(20)
            with in_netns_of(master):
                holder = holder_of(sock, [old, *gen2])
        client.check()
        inner = {ns_pid(pid): pid for pid in gen2}
        assert len(gen2) == 2 and set(inner) <= set(pids), f"generation 2: {list(inner)}"
        text = read(log)
        if squat == "socket":
            assert holder in gen2, text[-3000:]
            for pid in inner:
                assert stat.S_ISSOCK(os.stat(f"{pid_file}.handoff-{pid}").st_mode)
        else:
            assert holder == old  # no inbox on either new worker: the old one drains
            assert len(re.findall(r"no hand-off inbox", text)) == 2, text[-3000:]
        assert "failing" not in text and "reload failed" not in text, text[-3000:]
    finally:
        for s in squatters:
            s.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(outer.pid, signal.SIGKILL)
        outer.wait(scaled(10))
        reap_group(outer.pid)


def test_inboxes_are_private_and_removed(start_daemon):
    """An inbox is a 0600 socket beside the PID file, named after its worker, gone with it."""
    d = start_daemon(config=handoff_conf(workers=2))
    master = d.proc.pid
    gen1 = wait_pool(master, 2, generation=1)
    for pid in gen1:  # (a worker takes its title a moment before it opens its inbox)
        inbox = Path(f"{d.pid_file}.handoff-{pid}")
        wait_for(inbox.exists, 5, f"the inbox of worker {pid}")
        st = inbox.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    d.signal(signal.SIGTTOU)
    wait_pool(master, 1, generation=1)
    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    assert not list(d.tmp.glob("*.handoff-*")), list(d.tmp.glob("*"))


def test_hand_off_without_a_pid_file(start_daemon):
    """--pid-file '': no directory of ours beside a PID file, so the inboxes live in the
    default runtime directory (made private there, as the master would); TTOU still hands
    the retired worker's client over, and the inboxes are gone with their workers."""
    d = start_daemon("--pid-file", "", config=handoff_conf(workers=2), wait=False)
    match = wait_log(d.log_file, LISTENING.pattern, timeout=10)[0]
    d.port = int(match.group(2))
    master = d.proc.pid
    pool = wait_pool(master, 2, generation=1)
    by_number = {number: pid for pid, (number, _) in pool.items()}
    inbox = {pid: Path(Rendezvous("").path(pid)) for pid in pool}
    for path in inbox.values():
        wait_for(path.exists, 5, f"inbox {path}")
    (sock,) = connect_to(d, by_number[2], pool)
    with sock, ExactlyOnce(sock) as client:
        d.signal(signal.SIGTTOU)
        wait_for(lambda: gone(by_number[2]), 5, "worker 2 to hand its client over and exit")
        client.wait_more(20)
        holder = holder_of(sock, [by_number[1]])
    client.check()
    assert holder == by_number[1]
    assert handed(d.log()).get(by_number[2]) == [(1, 0)], d.log()[-3000:]
    assert not inbox[by_number[2]].exists()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    assert not inbox[by_number[1]].exists()


def test_a_client_that_pipelines_without_pause_is_handed_over_at_a_reload(start_daemon):
    """A client that keeps a batch of 4096 questions always ahead of the answers it reads: its
    worker holds input back and answers a slice per turn, yet each time the held input is used up
    the connection is at a question boundary as far as the worker knows (the kernel's unread bytes
    travel with the socket), so a reload hands it over rather than closing it at graceful_timeout."""
    d = start_daemon(config=handoff_conf(workers=1))
    master = d.proc.pid
    (old,) = wait_pool(master, 1, generation=1)
    failures: list[str] = []
    rounds = [0]
    stop = threading.Event()

    def flood() -> None:
        try:
            with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(10)) as sock:
                sock.sendall(b"?" * 4096)  # one batch always ahead: never at a question boundary
                while not stop.is_set():
                    sock.sendall(b"?" * 4096)
                    want = len(b"No idea.") * 4096
                    got = 0
                    while got < want:
                        chunk = sock.recv(min(65536, want - got))
                        if not chunk:
                            raise EOFError(f"closed after {got} of {want} bytes")
                        got += len(chunk)
                    rounds[0] += 1
        except BaseException as e:  # noqa: BLE001 - every kind of failure counts
            failures.append(repr(e))

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        wait_for(lambda: rounds[0] > 5 or failures, 10, "the flood to run")
        d.signal(signal.SIGHUP)
        wait_pool(master, 1, generation=2)
        wait_for(lambda: gone(old) or failures, GRACE + 5, "the old worker to hand the flood over and exit")
        before = rounds[0]
        wait_for(lambda: rounds[0] > before + 5 or failures, 10, "the flood to go on in generation 2")
    finally:
        stop.set()
        thread.join(scaled(10))
    assert not failures, failures
    assert "handed 1 connections over" in d.log(), d.log()[-3000:]
