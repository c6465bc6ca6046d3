"""Supervision: the master's worker table and the rules it judges workers by.

The rules are plain functions of what the master knows (the worker's record,
its scoreboard slot, its wait status, the time), so each can be tested alone
against an in-memory scoreboard and a fake clock (tests/test_supervision.py):

- classify_exit: why a worker left, which decides what the master does next;
- Backoff: how long a worker number waits before its next boot after boot
  failures (per number, so one number that cannot boot never delays the
  replacement of another that crashed after serving);
- last_sign_of_life / is_hung: when a worker counts as hung;
- generation_serving: when a generation counts as ready.

The Pool holds the live workers, their slots and back-off; Supervision is
the master's part that spawns, reaps, judges and retires workers by these
rules (a mixin of the Arbiter: it works on the master's own state).
"""

from __future__ import annotations

import enum
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import privileges
from .clients import ClientTable
from .config import Config
from .logs import log
from .proxied import proxied_listeners
from .rendezvous import remove_inbox
from .scoreboard import DRAINING, FREE, SLOTS, STARTING, STOPPING, Scoreboard, Slot, last_progress
from .worker import WorkerSpec, run_worker

if TYPE_CHECKING:
    from .arbiter import Arbiter

MAX_BACKOFF = 30.0  # cap of the delay between boots of a worker number that keeps dying at boot
FIRST_BACKOFF = 0.2
KILL_GRACE = 1.0  # how long a stop waits past its timeout before SIGKILL
# A master that someone waits for (--daemon's launcher, USR2's old master)
# gives up after this many boot failures in a row of one worker, instead of
# leaving them to wait for a timeout.
GIVE_UP_AFTER = 3


@dataclass
class WorkerProc:
    """The master's record of one worker process."""

    pid: int
    number: int
    generation: int
    slot: int
    started: float  # monotonic
    retiring: bool = False  # told to drain, or seen draining: not serving capacity any more
    killed: bool = False  # killed as hung
    served: bool = False  # seen past STARTING at least once


class Exit(enum.Enum):
    """Why a worker left; the master's reaction depends on nothing else."""

    STOPPED = "stopped"  # the master is stopping: expected
    RETIRED = "retired"  # the master retired it (reload, TTOU, upgrade) or saw it recycle
    RECYCLED = "recycled"  # it retired itself (max_requests) before the master noticed
    HUNG = "hung"  # the master killed it: no heartbeat for worker_timeout
    BOOT_FAILED = "boot failed"  # died before it ever served: back off
    CRASHED = "crashed"  # died while serving: replace at once


def classify_exit(worker: WorkerProc, last_state: int, status: int, stopping: bool) -> Exit:
    """Why `worker` left, given its slot's last state and its wait status."""
    if worker.killed:
        return Exit.HUNG
    if stopping:
        return Exit.STOPPED
    if worker.retiring:
        return Exit.RETIRED
    clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    if clean and last_state in (DRAINING, STOPPING):
        return Exit.RECYCLED
    if last_state == STARTING and not worker.served:
        return Exit.BOOT_FAILED
    return Exit.CRASHED


def describe_status(status: int) -> str:
    """'was killed by SIGKILL', 'was killed by SIGRTMIN+6', 'exited with code 3'."""
    if os.WIFSIGNALED(status):
        return f"was killed by {signal_name(os.WTERMSIG(status))}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"changed state (wait status {status:#x})"


def signal_name(signum: int) -> str:
    """A name for any signal number, real-time ones included (they have no Signals member)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        pass
    if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    return f"signal {signum}"


@dataclass
class Backoff:
    """Exponential delay between boots of one worker number: 0.2 s doubling to 30 s.

    The exponent is capped, so a boot failure that lasts for days never
    overflows a float; a worker that serves resets it.
    """

    failures: int = 0
    not_before: float = 0.0

    def failed(self, now: float) -> float:
        self.failures += 1
        delay = min(FIRST_BACKOFF * 2 ** min(self.failures - 1, 16), MAX_BACKOFF)
        self.not_before = now + delay
        return delay

    def reset(self) -> None:
        self.failures = 0
        self.not_before = 0.0


def last_sign_of_life(worker: WorkerProc, slot: Slot) -> float:
    """The monotonic time the worker last showed progress (scoreboard.last_progress).

    A heartbeat older than the worker (a slot not yet written by it, or read
    half-written) is no sign at all: its start time counts instead, so a
    healthy new worker is never killed for the machine's uptime.
    """
    return worker.started if slot.state == STARTING else last_progress(slot, worker.started)


def is_hung(worker: WorkerProc, slot: Slot, now: float, timeout: float) -> bool:
    return not worker.killed and slot.state != FREE and now - last_sign_of_life(worker, slot) > timeout


def generation_serving(workers: Iterable[WorkerProc], states: Callable[[WorkerProc], int],
                       generation: int, count: int) -> bool:
    """At least `count` unretired workers of `generation`, every one past STARTING."""
    members = [w for w in workers if w.generation == generation and not w.retiring]
    return len(members) >= count and all(states(w) != STARTING for w in members)


@dataclass
class Pool:
    """The live workers, the scoreboard slots they hold, and per-number back-off."""

    board: Scoreboard
    clock: Callable[[], float] = time.monotonic
    workers: dict[int, WorkerProc] = field(default_factory=dict)
    # (generation, number) -> back-off: a new generation that cannot boot
    # never delays the current one's replacements, nor the other way round.
    backoff: dict[tuple[int, int], Backoff] = field(default_factory=dict)

    def state(self, worker: WorkerProc) -> int:
        return self.board.read_slot(worker.slot).state

    def serving(self, generation: int) -> list[WorkerProc]:
        """Workers of `generation` that have not been retired."""
        return [w for w in self.workers.values() if w.generation == generation and not w.retiring]

    def missing(self, generation: int, target: int) -> list[int]:
        """Worker numbers (1..target) of `generation` that no unretired worker holds."""
        taken = {w.number for w in self.serving(generation)}
        return [n for n in range(1, target + 1) if n not in taken]

    def may_spawn(self, generation: int, number: int) -> bool:
        backoff = self.backoff.get((generation, number))
        return backoff is None or self.clock() >= backoff.not_before

    def spawn(self, number: int, generation: int, fork: Callable[[int], int]) -> WorkerProc | None:
        """Give worker `number` a slot and fork it with fork(slot); None when it must wait.

        A full scoreboard or a failed fork() (EAGAIN, ENOMEM) backs the
        number off and is retried by the loop; nothing is raised.
        """
        try:
            slot = self.board.free_slot()
        except RuntimeError:  # every slot taken by draining generations: wait for them
            log.error("scoreboard full: worker %d not spawned yet", number)
            self.backoff.setdefault((generation, number), Backoff()).not_before = self.clock() + 1.0
            return None
        self.board.write_slot(slot, Slot(state=STARTING, number=number, generation=generation))
        try:
            pid = fork(slot)
        except OSError as e:
            self.board.clear_slot(slot)
            delay = self.backoff.setdefault((generation, number), Backoff()).failed(self.clock())
            log.error("cannot fork worker %d: %s; retrying in %.1fs", number, e.strerror, delay)
            return None
        worker = WorkerProc(pid, number, generation, slot, self.clock())
        self.workers[pid] = worker
        return worker

    def reaped(self, pid: int, status: int, stopping: bool) -> tuple[WorkerProc, Slot, Exit] | None:
        """Forget a reaped worker and free its slot; the worker, its last slot and why it left."""
        worker = self.workers.pop(pid, None)
        if worker is None:
            return None  # not a worker: the short-lived launcher of a USR2 successor
        slot = self.board.read_slot(worker.slot)
        self.board.clear_slot(worker.slot)
        why = classify_exit(worker, slot.state, status, stopping)
        if why is Exit.BOOT_FAILED:
            self.backoff.setdefault((worker.generation, worker.number), Backoff()).failed(self.clock())
        return worker, slot, why

    def observe(self, worker: WorkerProc, slot: Slot) -> None:
        """A worker seen past STARTING has served: its number's back-off is over."""
        if not worker.served and slot.state not in (FREE, STARTING):
            worker.served = True
            self.backoff.pop((worker.generation, worker.number), None)

    def forget_backoff(self, keep: Iterable[int]) -> None:
        """Drop the back-off of generations no longer wanted (an aborted reload's)."""
        kept = set(keep)
        for key in [key for key in self.backoff if key[0] not in kept]:
            del self.backoff[key]

    def failures(self, worker: WorkerProc) -> int:
        backoff = self.backoff.get((worker.generation, worker.number))
        return backoff.failures if backoff else 0

    def delay(self, worker: WorkerProc) -> float:
        backoff = self.backoff.get((worker.generation, worker.number))
        return max(0.0, backoff.not_before - self.clock()) if backoff else 0.0

    def signal_all(self, signum: int) -> None:
        for pid in list(self.workers):
            kill(pid, signum)


class Supervision:
    """Spawning, reaping, judging and retiring workers, as a part of the master."""

    def targets(self: Arbiter) -> list[tuple[int, int, Config, dict[str, socket.socket]]]:
        """The generations to keep full: (generation, workers, config, sockets)."""
        wanted = [(self.generation, self.target, self.cfg, self.listeners)]
        if self.reload:
            reload = self.reload
            wanted.append((reload.generation, reload.cfg.workers, reload.cfg, reload.listeners))
        return wanted

    def missing_any(self: Arbiter) -> bool:
        return any(self.pool.missing(gen, count) for gen, count, _, _ in self.targets())

    def spawn_missing(self: Arbiter) -> None:
        for generation, count, cfg, listeners in self.targets():
            for number in self.pool.missing(generation, count):
                if self.pool.may_spawn(generation, number):
                    self.spawn(number, generation, cfg, listeners)

    def spawn(self: Arbiter, number: int, generation: int, cfg: Config,
              listeners: dict[str, socket.socket]) -> None:
        jitter = random.randint(0, cfg.max_requests_jitter) if cfg.max_requests else 0
        clients = self.client_table() if cfg.max_connections_per_client else None

        def fork(slot: int) -> int:
            spec = WorkerSpec(number, generation, list(listeners.values()), cfg, self.pid, self.board, slot,
                              self.events_w, cfg.max_requests + jitter, clients,
                              proxied_listeners(cfg, listeners), self.loads,
                              held=bool(self.header.accepts_held))
            if self.clients is not None:
                self.clients.open_region(slot)
            if self.loads is not None:
                self.loads.open_slot(slot)
            # Signals stay blocked across fork, and in the child until the
            # worker's own handlers are in place (worker.py unblocks them).
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signal_table())
            try:
                pid = os.fork()
                if pid == 0:
                    self._become_worker(spec)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            return pid

        worker = self.pool.spawn(number, generation, fork)
        if worker:
            log.info("spawned worker %d (pid %d, gen %d)", number, worker.pid, generation)

    def client_table(self: Arbiter) -> ClientTable | None:
        """The per-client counts shared by all our workers, made when a config first sets a limit.

        If the mapping cannot be made, workers run without the limit (logged); the next spawn retries.
        """
        if self.clients is None:
            try:
                self.clients = ClientTable(SLOTS)
            except OSError as e:
                log.error("max_connections_per_client: cannot map the shared counts (%s): not enforced",
                          e.strerror)
        return self.clients

    def _become_worker(self: Arbiter, spec: WorkerSpec) -> None:
        """In the forked child: drop the master's plumbing, serve, and never return."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in self.signal_table():
                signal.signal(sig, signal.SIG_DFL)
            channels = [c.fd for c in (self.predecessor, self.upgrade and self.upgrade.channel) if c]
            for fd in {self.sig_r, self.sig_w, self.events_r, self.ready_fd, *channels}:
                if fd is not None and fd >= 0:
                    os.close(fd)  # held here, a pipe to a master would never show it gone
            others = [*self.listeners.values(), *(self.reload.listeners.values() if self.reload else ())]
            for sock in others:
                if sock not in spec.listeners:
                    sock.close()
            if self.metrics:
                self.metrics.close()
            self.close_balance()
            identity = privileges.resolve(spec.cfg.user, spec.cfg.group)  # checked at start
            if identity is not None:
                privileges.drop(identity)  # before any client: an OSError ends this worker (boot failure)
            code = run_worker(spec)
        except BaseException:
            log.exception("worker crashed")
        finally:
            os._exit(code)

    def retire(self: Arbiter, worker: WorkerProc) -> None:
        """Drain a worker: it stops accepting and leaves when its clients have."""
        if not worker.retiring:
            worker.retiring = True
            kill(worker.pid, signal.SIGUSR2)

    def reap(self: Arbiter) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            found = self.pool.reaped(pid, status, bool(self.stopping))
            if found:
                if self.clients is not None:  # its connections are gone: so are their counts
                    self.clients.clear(found[0].slot)
                if self.loads is not None:
                    self.loads.clear(found[0].slot)
                self.worker_exited(*found, status)

    def worker_exited(self: Arbiter, worker: WorkerProc, slot: Slot, why: Exit, status: int) -> None:
        if os.WIFSIGNALED(status):
            remove_inbox(self.cfg.pid_file, worker.pid)
        self.header.retired.add(slot.counters)  # its totals outlive it
        how = describe_status(status)
        name = f"worker {worker.number} (pid {worker.pid}, gen {worker.generation})"
        new = self.reload is not None and worker.generation == self.reload.generation
        if why in (Exit.STOPPED, Exit.RETIRED):
            log.info("%s %s", name, how)
        elif why is Exit.RECYCLED:
            self.header.recycled += 1
            log.info("%s recycled after max_requests: %s", name, how)
        elif new:  # the new config may be what kills them: back to the old generation
            self.header.replaced_crashed += why is not Exit.HUNG
            self.header.replaced_hung += why is Exit.HUNG
            self.abort_reload(f"new {name} {how} ({why.value})")
        elif why is Exit.HUNG:
            self.header.replaced_hung += 1
            log.warning("%s %s after it hung: replacing it", name, how)
        elif why is Exit.BOOT_FAILED:
            self.header.replaced_crashed += 1
            log.error("%s %s during boot (%d in a row): next spawn in %.1fs",
                      name, how, self.pool.failures(worker), self.pool.delay(worker))
            if self.ready_fd is not None and self.pool.failures(worker) >= GIVE_UP_AFTER:
                self.give_up(f"workers cannot boot: {name} {how} ({GIVE_UP_AFTER} times)")
        else:
            self.header.replaced_crashed += 1
            log.warning("%s %s unexpectedly: replacing it", name, how)

    def check_workers(self: Arbiter) -> None:
        """Kill workers whose loop stopped ticking; notice self-retired ones; mark the served."""
        now = time.monotonic()
        for worker in list(self.pool.workers.values()):
            slot = self.board.read_slot(worker.slot)
            self.pool.observe(worker, slot)
            if slot.state == DRAINING and not worker.retiring:
                worker.retiring = True  # max_requests reached: it retired itself
                self.header.recycled += 1
                log.info("worker %d (pid %d) recycled after max_requests", worker.number, worker.pid)
            if is_hung(worker, slot, now, self.cfg.worker_timeout):
                log.error("worker %d (pid %d) made no progress for %.0fs: killing it",
                          worker.number, worker.pid, now - last_sign_of_life(worker, slot))
                worker.killed = True
                kill(worker.pid, signal.SIGKILL)
        if not self.announced_ready and self.generation_serving(self.generation, self.target):
            self.announce_ready()

    def generation_serving(self: Arbiter, generation: int, count: int) -> bool:
        return generation_serving(self.pool.workers.values(), self.pool.state, generation, count)


def kill(pid: int, signum: int) -> None:
    """Signal a process that may have exited already."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
