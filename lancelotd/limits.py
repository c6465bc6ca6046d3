"""Descriptor limits: what a failed accept() means, and what RLIMIT_NOFILE allows (docs/PROMISES.md §6).

A worker out of descriptors (or of kernel memory) cannot accept, but the
connection stays queued and the level-triggered listener keeps waking it: so
it stops watching the listeners for ACCEPT_PAUSE, as nginx does, and logs the
episode once when it starts and once when it ends - never once per attempt.
"""

from __future__ import annotations

import errno
import resource

from .logs import log

ACCEPT_PAUSE = 0.5  # seconds a worker that cannot accept stops trying (nginx: accept_mutex_delay)

# accept(2): "Linux accept() passes already-pending network errors on the new
# socket as an error code from accept()" - and a firewall's EPERM.  That client
# is gone; the next one in the queue is not: carry on with it.
CLIENT_GONE = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
    errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.ETIMEDOUT,
})
# Every other error pauses accepting: these are expected, anything else
# would be a bug, which must not make a worker spin either.
WHY = {
    errno.EMFILE: "descriptor limit reached",
    errno.ENFILE: "system-wide descriptor limit reached",
    errno.ENOBUFS: "out of kernel memory",
    errno.ENOMEM: "out of kernel memory",
    errno.ENOSPC: "epoll watch limit reached (fs.epoll.max_user_watches)",  # epoll_ctl, after accept
}

# Descriptors a worker holds besides its clients: stdio, log file, epoll,
# signal pipe, events pipe, scoreboard, listeners, hand-off inbox (measured: 11).
WORKER_OWN_FDS = 16


class AcceptPause:
    """One episode of accept() failing for want of a resource: counted, and logged twice.

    The episode ends once accept() has not failed for QUIET seconds; a worker
    that pauses and fails again at every resume stays in the same episode.
    """

    QUIET = 1.0

    def __init__(self) -> None:
        self.started: float | None = None
        self.last = 0.0  # the latest failure
        self.failed = 0

    def failure(self, error: OSError, now: float, connections: int) -> None:
        if self.started is None:
            self.started, self.failed = now, 0
            name = errno.errorcode.get(error.errno or 0, str(error.errno))
            log.warning("%s (%s) at %d connections: not accepting for %.1fs at a time until it passes",
                        WHY.get(error.errno or 0, f"accept failed: {error.strerror}"), name, connections,
                        ACCEPT_PAUSE)
        self.failed += 1
        self.last = now

    def check_over(self, now: float) -> None:
        """Called on the tick: log the end of an episode once accept() stopped failing."""
        if self.started is not None and now - self.last >= self.QUIET:
            log.info("accepting again after %d failed accept attempts in %.1fs",
                     self.failed, self.last - self.started + ACCEPT_PAUSE)
            self.started = None


def nofile_advice(max_connections: int, workers: int, limit: int | None = None) -> str | None:
    """The warning to log when max_connections cannot be reached under RLIMIT_NOFILE, else None.

    `limit` defaults to this process's soft limit: call it in the master after
    raising the soft limit to the hard one (workers inherit it).  A worker
    needs WORKER_OWN_FDS for itself and, during a reload, one hand-off channel
    per worker of the other generation.
    """
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    reserved = WORKER_OWN_FDS + workers
    if max_connections + reserved <= limit:
        return None
    usable = max(limit - reserved, 0)
    return (f"max_connections {max_connections} exceeds the descriptor limit {limit} (RLIMIT_NOFILE, "
            f"less about {reserved} a worker needs for itself): a worker stops accepting at about {usable} "
            f"connections and pauses accepting for {ACCEPT_PAUSE}s each time it hits the limit; "
            f"raise the limit (LimitNOFILE=, ulimit -n) or lower max_connections")


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (in the master, before it forks): each connection is a
    descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)
