"""The master's supervision rules, one by one, against an in-memory scoreboard and a fake clock.

The end-to-end tests (test_lifecycle.py, test_master_faults.py) show the
rules at work in real processes; these pin each rule down in milliseconds.
"""

from __future__ import annotations

import errno
import signal

import pytest

from lancelotd.scoreboard import DRAINING, FREE, SERVING, SLOTS, STARTING, STOPPING, Scoreboard, Slot
from lancelotd.supervision import (
    MAX_BACKOFF,
    Backoff,
    Exit,
    Pool,
    WorkerProc,
    classify_exit,
    describe_status,
    generation_serving,
    is_hung,
    last_sign_of_life,
)


def exited(code: int) -> int:
    """A wait status for a process that called exit(code)."""
    return code << 8


def killed(signum: int) -> int:
    """A wait status for a process killed by `signum`."""
    return signum


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Forks:
    """Stands in for os.fork in the master: hands out PIDs, or fails as fork() can."""

    def __init__(self) -> None:
        self.next_pid = 100
        self.fail: int | None = None

    def __call__(self, slot: int) -> int:
        if self.fail is not None:
            raise OSError(self.fail, "fork failed")
        self.next_pid += 1
        return self.next_pid


@pytest.fixture
def pool() -> Pool:
    return Pool(Scoreboard.create(None), clock=Clock())


def worker(**kw) -> WorkerProc:
    return WorkerProc(**{"pid": 1, "number": 1, "generation": 1, "slot": 0, "started": 10.0, **kw})


# --- why a worker left ----------------------------------------------------------

@pytest.mark.parametrize("record, state, status, stopping, expected", [
    (dict(killed=True), SERVING, killed(signal.SIGKILL), False, Exit.HUNG),
    (dict(killed=True), SERVING, killed(signal.SIGKILL), True, Exit.HUNG),
    ({}, SERVING, killed(signal.SIGTERM), True, Exit.STOPPED),
    (dict(retiring=True), DRAINING, exited(0), False, Exit.RETIRED),
    ({}, DRAINING, exited(0), False, Exit.RECYCLED),  # max_requests, before the master noticed
    ({}, STOPPING, exited(0), False, Exit.RECYCLED),
    ({}, DRAINING, killed(signal.SIGSEGV), False, Exit.CRASHED),
    ({}, STARTING, exited(3), False, Exit.BOOT_FAILED),
    ({}, STARTING, killed(40), False, Exit.BOOT_FAILED),
    (dict(served=True), STARTING, exited(1), False, Exit.CRASHED),
    ({}, SERVING, killed(40), False, Exit.CRASHED),
    ({}, SERVING, exited(0), False, Exit.CRASHED),  # a serving worker has no business leaving
])
def test_classify_exit(record, state, status, stopping, expected):
    assert classify_exit(worker(**record), state, status, stopping) is expected


@pytest.mark.parametrize("status, text", [
    (killed(signal.SIGKILL), "was killed by SIGKILL"),
    (killed(signal.SIGRTMIN), "was killed by SIGRTMIN"),
    (killed(35), f"was killed by SIGRTMIN+{35 - signal.SIGRTMIN}"),
    (killed(40), f"was killed by SIGRTMIN+{40 - signal.SIGRTMIN}"),
    (killed(63), f"was killed by SIGRTMIN+{63 - signal.SIGRTMIN}"),
    (exited(3), "exited with code 3"),
])
def test_every_signal_has_a_name(status, text):
    assert describe_status(status) == text


# --- back-off -------------------------------------------------------------------

def test_backoff_doubles_to_its_cap_and_never_overflows():
    backoff = Backoff()
    delays = [backoff.failed(0.0) for _ in range(12)]
    assert delays[:4] == [0.2, 0.4, 0.8, 1.6]
    assert delays[-1] == MAX_BACKOFF
    for _ in range(5000):  # days of a worker that cannot boot: 2 ** 5000 would overflow a float
        delay = backoff.failed(0.0)
    assert delay == MAX_BACKOFF
    backoff.reset()
    assert backoff.failed(0.0) == 0.2


def test_boot_failures_back_off_until_a_worker_serves(pool):
    forks, clock = Forks(), pool.clock
    first = pool.spawn(1, 1, forks)
    pool.reaped(first.pid, exited(3), stopping=False)
    assert not pool.may_spawn(1, 1)
    clock.now += 0.21
    assert pool.may_spawn(1, 1)
    second = pool.spawn(1, 1, forks)
    pool.reaped(second.pid, exited(3), stopping=False)
    clock.now += 0.21
    assert not pool.may_spawn(1, 1), "the second failure waits 0.4 s"
    clock.now += 0.2
    third = pool.spawn(1, 1, forks)
    pool.board.write_slot(third.slot, Slot(pid=third.pid, number=1, generation=1, state=SERVING,
                                           heartbeat=clock.now))
    pool.observe(third, pool.board.read_slot(third.slot))
    assert third.served and pool.failures(third) == 0, "serving ends the episode"
    _, _, why = pool.reaped(third.pid, killed(signal.SIGSEGV), stopping=False)
    assert why is Exit.CRASHED
    assert pool.may_spawn(1, 1), "a crash after serving is replaced at once"


def test_one_numbers_boot_failures_never_delay_anothers_replacement(pool):
    forks = Forks()
    failing = pool.spawn(1, 1, forks)
    pool.reaped(failing.pid, exited(3), stopping=False)
    serving = pool.spawn(2, 1, forks)
    pool.board.write_slot(serving.slot, Slot(state=SERVING, heartbeat=pool.clock()))
    pool.observe(serving, pool.board.read_slot(serving.slot))
    pool.reaped(serving.pid, killed(signal.SIGKILL), stopping=False)
    assert not pool.may_spawn(1, 1)
    assert pool.may_spawn(1, 2)


def test_a_new_generations_boot_failure_does_not_delay_the_current_one(pool):
    forks = Forks()
    new = pool.spawn(1, 2, forks)
    pool.reaped(new.pid, exited(3), stopping=False)
    assert not pool.may_spawn(2, 1)
    assert pool.may_spawn(1, 1)
    pool.forget_backoff([1])  # the reload was aborted
    assert pool.backoff == {}


def test_failed_fork_backs_off_and_frees_the_slot(pool):
    forks = Forks()
    forks.fail = errno.EAGAIN
    assert pool.spawn(1, 1, forks) is None
    assert list(pool.board.slots()) == []
    assert not pool.may_spawn(1, 1)
    forks.fail = None
    pool.clock.now += 0.21
    assert pool.spawn(1, 1, forks) is not None


def test_full_scoreboard_delays_the_spawn(pool):
    for index in range(SLOTS):
        pool.board.write_slot(index, Slot(state=DRAINING))
    assert pool.spawn(1, 1, Forks()) is None
    assert not pool.may_spawn(1, 1)
    pool.board.clear_slot(7)
    pool.clock.now += 1.01
    assert pool.spawn(1, 1, Forks()).slot == 7


def test_reaped_frees_the_slot_and_ignores_strangers(pool):
    w = pool.spawn(1, 1, Forks())
    assert pool.reaped(99999, exited(0), stopping=False) is None  # a USR2 launcher
    pool.reaped(w.pid, exited(0), stopping=True)
    assert pool.board.read_slot(w.slot).state == FREE and not pool.workers


# --- hung workers -----------------------------------------------------------------

def test_a_heartbeat_older_than_the_worker_is_no_sign_of_life():
    w = worker(started=500.0)
    # Read half-written: SERVING already, heartbeat still the master's 0.
    assert last_sign_of_life(w, Slot(state=SERVING, heartbeat=0.0)) == 500.0
    assert not is_hung(w, Slot(state=SERVING, heartbeat=0.0), now=510.0, timeout=30.0)
    assert is_hung(w, Slot(state=SERVING, heartbeat=0.0), now=531.0, timeout=30.0)
    assert last_sign_of_life(w, Slot(state=SERVING, heartbeat=520.0)) == 520.0
    assert not is_hung(w, Slot(state=SERVING, heartbeat=520.0), now=549.0, timeout=30.0)
    assert is_hung(w, Slot(state=SERVING, heartbeat=520.0), now=551.0, timeout=30.0)


def test_starting_counts_from_the_fork_and_killed_workers_are_not_killed_twice():
    w = worker(started=500.0)
    assert is_hung(w, Slot(state=STARTING, heartbeat=999.0), now=531.0, timeout=30.0)
    w.killed = True
    assert not is_hung(w, Slot(state=STARTING), now=999.0, timeout=30.0)


# --- readiness ----------------------------------------------------------------------

def test_a_generation_serves_when_every_unretired_member_is_past_starting():
    members = [worker(pid=1, number=1, generation=2), worker(pid=2, number=2, generation=2),
               worker(pid=3, number=1, generation=1)]
    states = {1: SERVING, 2: STARTING, 3: SERVING}

    def state(w: WorkerProc) -> int:
        return states[w.pid]

    assert not generation_serving(members, state, 2, 2)
    states[2] = SERVING
    assert generation_serving(members, state, 2, 2)
    assert not generation_serving(members, state, 2, 3), "one short"
    members[1].retiring = True
    assert not generation_serving(members, state, 2, 2), "a retiring worker is no capacity"
