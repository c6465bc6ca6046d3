"""Stray signals: the ones nobody sends us on purpose whose default action would end a process.

`kill -ALRM <master>` (a typo, a script aimed at the wrong PID, a profiler) must not end the
service and every connection with it.  So:

- The master blocks every one of them and collects them with sigtimedwait() once a loop turn
  (at most 0.5 s): each is logged with its sender's PID from siginfo, "ignored signal SIGALRM
  from pid 4242", at most once a minute per signal (with the count of those not logged), and
  the loop goes on.  Blocked, they need no handler and cannot interrupt anything.
- Workers ignore them (SIG_IGN), except SIGALRM, which is their own timer: a stray one is a
  spurious alarm, and the worker's _alarm checks what is actually due.

Left at their default: SIGKILL and SIGSTOP (cannot be caught), and the signals the kernel sends
for a fault of the process itself (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS):
ignoring those would hide a crash.  The signals with a meaning (HUP, TERM, INT, QUIT, USR1,
USR2, TTIN, TTOU, CHLD) are the master's signal table (arbiter.py) and the worker's own.
"""

from __future__ import annotations

import signal
import time

from .logs import log

STRAY = frozenset({
    signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGPWR, signal.SIGXCPU,
    *([signal.SIGSTKFLT] if hasattr(signal, "SIGSTKFLT") else []),
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
})
LOG_EVERY = 60.0  # seconds between two log lines for one signal
MOST_PER_TURN = 256  # real-time signals queue: a flood is read over several turns


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


class StrayLog:
    """The master's: collect the blocked strays, log them rate-limited."""

    def __init__(self) -> None:
        self.logged_at: dict[int, float] = {}  # signal -> when it was last logged
        self.unlogged: dict[int, int] = {}  # signal -> how many came since, not logged

    @staticmethod
    def block() -> None:
        """From now on (and in every child forked from now on, until it says otherwise)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, STRAY)

    def collect(self) -> int:
        """Read and log the strays pending now; how many there were."""
        count = 0
        for _ in range(MOST_PER_TURN):
            try:
                info = signal.sigtimedwait(STRAY, 0)
            except OSError:  # EINTR and the like: the next turn reads them
                break
            if info is None:
                break
            count += 1
            self.note(info.si_signo, info.si_pid, time.monotonic())
        return count

    def note(self, signum: int, sender: int, now: float) -> None:
        last = self.logged_at.get(signum)
        if last is not None and now - last < LOG_EVERY:
            self.unlogged[signum] = self.unlogged.get(signum, 0) + 1
            return
        self.logged_at[signum] = now
        more = self.unlogged.pop(signum, 0)
        since = f" ({more} more since the last one logged)" if more else ""
        by = f" from pid {sender}" if sender else ""
        log.warning("ignored signal %s%s: it has no meaning for lancelotd%s", name(signum), by, since)


def ignore_in_worker() -> None:
    """In a worker, before it unblocks: ignored (SIGALRM, its own timer, excepted)."""
    for signum in STRAY - {signal.SIGALRM}:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STRAY)
