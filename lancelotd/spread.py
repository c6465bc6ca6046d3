"""Spreading new connections over the workers.

Every worker waits on the shared listeners with EPOLLEXCLUSIVE, and the
kernel wakes the first worker in the listener's wait queue that is waiting.
While that worker is woken but not yet running it still counts as waiting,
so it is chosen again for every connection of a burst, and its accept loop
then takes the whole burst.  Measured on two idle workers: 10 persistent
clients landed 9 / 1, 50 landed 47 / 3 or 50 / 0.  A load that lands on one
worker is served by one Python process.

The remedy: a worker that accepts past its share *yields*.  Its share is the
least loaded accepting worker's count plus a margin (SPREAD_MARGIN, or a
quarter of that count, whichever is larger: short-lived connections come and
go without a yield).  Yielding means: stop watching the listeners for
YIELD_SECONDS, and nudge that worker (SIGURG), which accepts at once from the
listeners; the kernel would not wake it for connections already queued.  A
nudged worker that is itself yielding resumes.  After the pause the yielding
worker watches the listeners again, at the tail of their wait queues.

So the workers take a burst in turns, and nothing waits on a worker that
cannot accept: a nudged worker that did not take a single connection while
we paused (hung, busy in a long turn) is *deaf*, never yielded to again until
its count moves, and the pause is short.  A worker that stopped accepting
(full, out of descriptors, retiring, stopping) publishes 0 and is never
yielded to.

The counts are shared the way clients.py shares its counts: an anonymous
MAP_SHARED mapping the master makes before it forks, two 8-byte words per
scoreboard slot that only that slot's worker writes (live connections + 1
while it accepts, else 0; its PID), and word 0 the high-water mark of slots
in use.  The master zeroes a slot's words before it forks into it and after
it reaps the worker, so a dead worker is never yielded to (a PID freed by
the reap could be nudged in the instant before the words are zeroed: SIGURG's
default action is to ignore it).  A worker writes its count when it accepts,
on its tick and when it starts or stops accepting; a count a little stale
only moves the moment of a yield.

Cost per accept wake-up: one store and one scan of the slots in use.
"""

from __future__ import annotations

import mmap
import os
import signal
from typing import TYPE_CHECKING, NamedTuple

from .logs import log
from .scoreboard import SERVING

if TYPE_CHECKING:
    from .worker import Worker

SPREAD_MARGIN = 4  # connections a worker may be ahead of the least loaded one (at least)
CHURN = 2  # accepted in a tick past CHURN x live connections: short-lived connections, left to the kernel
DEAF_AFTER = 3  # yields in a row that a peer did not answer by accepting
FORGET_AFTER = 64  # deaf and missed records kept (by PID) before starting afresh
YIELD_SECONDS = 0.01  # how long a worker that yielded leaves the listeners to the others
NUDGE = signal.SIGURG  # "accept now": ignored by default, so a stale PID does no harm
NO_LIMIT = 1 << 62


class Peer(NamedTuple):
    slot: int
    word: int  # as published: live connections + 1
    pid: int


class AcceptLoads:
    """The shared words: [slots in use, pad, slot 0's load, slot 0's PID, slot 1's load, ...]."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.mem = mmap.mmap(-1, (2 + 2 * slots) * 8, flags=mmap.MAP_SHARED)
        self.words = memoryview(self.mem).cast("q")

    # --- the master's part ---------------------------------------------------

    def open_slot(self, slot: int) -> None:
        """Before a worker is forked into `slot`: not accepting yet, and scanned by the others."""
        self.clear(slot)
        if self.words[0] <= slot:
            self.words[0] = slot + 1

    def clear(self, slot: int) -> None:
        """Its worker is gone (or not born yet): never yielded to."""
        self.words[2 + 2 * slot] = 0
        self.words[3 + 2 * slot] = 0

    # --- a worker's part -----------------------------------------------------

    def claim(self, slot: int, pid: int) -> None:
        """Once, when a worker starts: who to nudge (the master zeroes it at the reap)."""
        self.words[3 + 2 * slot] = pid

    def publish(self, slot: int, live: int, accepting: bool) -> None:
        self.words[2 + 2 * slot] = live + 1 if accepting else 0

    def word(self, slot: int) -> int:
        return self.words[2 + 2 * slot]

    def least_loaded(self, me: int, deaf: dict[int, int]) -> Peer | None:
        """The accepting worker with the fewest connections, not counting us nor the deaf (PID -> word)."""
        words = self.words
        best = None
        for slot in range(min(words[0], self.slots)):
            word = words[2 + 2 * slot]
            if word and slot != me and (best is None or word < best.word):
                pid = words[3 + 2 * slot]
                if pid > 0 and deaf.get(pid) != word:  # 0: the master cleared it just now
                    best = Peer(slot, word, pid)
        return best


def make_loads(slots: int) -> AcceptLoads | None:
    """The master's table, or None (logged) if it cannot be mapped: then the kernel alone decides."""
    try:
        return AcceptLoads(slots)
    except OSError as e:
        log.warning("cannot map the accept loads (%s): new connections are not spread", e.strerror)
        return None


class Spreading:
    """The Worker's side: its share, yielding, being nudged."""

    def _init_spreading(self: Worker, loads: AcceptLoads | None) -> None:
        self.loads = loads if self.cfg.spread_connections else None
        if self.loads is not None:
            self.loads.claim(self.spec.slot, os.getpid())
        self.yielding: Peer | None = None  # the worker we yielded to, while we pause
        self.yield_to: Peer | None = None  # the least loaded worker, found by _share
        self.deaf: dict[int, int] = {}  # PID -> the word it did not move from when nudged
        self.missed: dict[int, int] = {}  # PID -> yields in a row it did not answer
        self.churning = False  # connections come and go within a tick: no spreading
        self.accepted_at_tick = 0
        self.yields = 0

    def _spread_tick(self: Worker) -> None:
        """Once per tick: are connections short-lived (then the kernel spreads them well enough)?"""
        accepted = self.counters.accepted
        live = len(self.conns) + len(self.awaiting)
        self.churning = accepted - self.accepted_at_tick > CHURN * live + SPREAD_MARGIN
        self.accepted_at_tick = accepted
        if len(self.deaf) + len(self.missed) > FORGET_AFTER:  # workers come and go (max_requests)
            self.deaf.clear()
            self.missed.clear()
        self._publish_load()

    def _publish_load(self: Worker) -> None:
        if self.loads is not None:
            pausing = self.yielding is not None and self.state == SERVING
            live = len(self.conns) + len(self.awaiting)
            self.loads.publish(self.spec.slot, live, self.accepting or pausing)

    def _share(self: Worker) -> int:
        """How many connections we may hold before we yield (at the start of an accept wake-up)."""
        loads = self.loads
        if loads is None:
            return NO_LIMIT
        live = len(self.conns) + len(self.awaiting)
        loads.publish(self.spec.slot, live, True)
        if self.churning or self.counters.accepted - self.accepted_at_tick > CHURN * live + SPREAD_MARGIN:
            self.churning = True  # until the next tick says otherwise
            return NO_LIMIT
        peer = loads.least_loaded(self.spec.slot, self.deaf)
        if peer is None:
            return NO_LIMIT
        self.yield_to = peer
        live = peer.word - 1
        return live + max(SPREAD_MARGIN, live // 4)

    def _yield_accepts(self: Worker) -> None:
        """Past our share: leave the listeners to the least loaded worker for a moment, and nudge it."""
        peer = self.yield_to
        if peer is None:  # _share found none: nobody to yield to
            return
        self._stop_accepting()
        self.yielding = peer
        self.yields += 1
        self._publish_load()
        signal.setitimer(signal.ITIMER_REAL, YIELD_SECONDS)
        try:
            os.kill(peer.pid, NUDGE)
        except OSError:  # gone: the master will zero its words
            self.deaf[peer.pid] = peer.word

    def _end_yield(self: Worker) -> None:
        """The pause is over (alarm): a peer that took nothing meanwhile is deaf to nudges."""
        peer, self.yielding = self.yielding, None
        if peer is not None and self.loads is not None:
            if self.loads.word(peer.slot) != peer.word:
                self.missed.pop(peer.pid, None)
            else:
                self.missed[peer.pid] = missed = self.missed.get(peer.pid, 0) + 1
                if missed >= DEAF_AFTER:
                    self.deaf[peer.pid] = peer.word
        if not self.accept_paused:
            self._resume_accepting()

    def _nudged(self: Worker, now: float) -> None:
        """Another worker yielded to us: accept what is queued now (the kernel will not wake us for it)."""
        if self.yielding is not None:
            self.yielding = None
            if not self.accept_paused:
                self._resume_accepting()
        if self.accepting:
            for listener in list(self.listeners.values()):
                if self.accepting:
                    self._accept(listener, now)
