"""Stopping the master: the order in which it stops accepting, tells its workers, and cleans up.

A room of the Arbiter (arbiter.py).  Owns stopping, stop_deadline and shared_with's clearing;
reads the listeners, the pool and the upgrade state.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

from . import pidfile
from .logs import log
from .sockets import ACTIVATED, refuse_new_connections
from .upgrade import alive

if TYPE_CHECKING:
    from .arbiter import Arbiter


class Stopping:
    """How the master stops (a mixin of the Arbiter)."""

    def begin_stop(self: Arbiter, how: str, worker_signal: int, grace: float) -> None:
        """Stop accepting in the right order, then tell the workers.

        The master closes its copies of the listening sockets first, so that
        once the workers have made their last accept sweep and closed theirs,
        a new connection is refused (a client or balancer can retry that)
        instead of queued on a socket nobody will accept from.  Socket-
        activated ones stay: systemd holds them and queues for our successor.
        """
        if self.stopping == "fast" or self.stopping == how:
            return
        if self.stopping == "upgraded" and how != "fast":  # retiring hands every client over already
            log.info("%s stop: already handing over to the new master", how)
            return
        if how != "upgraded":
            self.notifier.stopping()
        log.info("%s stop: signalling %d workers", how, len(self.pool.workers))
        self.stopping = how  # first: nothing below may start a queued reload
        self.reload_queued = False
        # Sockets shared with the other master of an upgrade are closed, never filtered: after a
        # hand-over they are the successor's; a successor shares its predecessor's until that one
        # confirms; a successor we start, or one that failed, holds ours until it is gone.
        shared = how == "upgraded" or self.listeners_shared()
        if self.upgrade:
            self.abandon_upgrade("stopping")
        self.stop_deadline = time.monotonic() + grace
        self.release_listeners(shared)
        if how == "upgraded":
            for worker in list(self.pool.workers.values()):
                self.retire(worker)
        else:
            self.pool.signal_all(worker_signal)

    def listeners_shared(self: Arbiter) -> bool:
        """Does another master hold our listening sockets now?  (See shared_with.)"""
        if self.upgrade is not None:
            return True
        if self.shared_with and not alive(self.shared_with):
            self.shared_with = 0
        return bool(self.shared_with)

    def release_listeners(self: Arbiter, shared: bool) -> None:
        """Close our copies: all of them when another master shares them, else those that are not
        systemd's, first making them refuse new connections for good."""
        sets = [self.listeners] + ([self.reload.listeners] if self.reload else [])
        for listeners in sets:
            for address in [a for a in listeners if shared or not a.startswith(ACTIVATED)]:
                sock = listeners.pop(address)
                if not shared and sock.fileno() != -1:
                    refuse_new_connections(sock)
                self.close_listeners({address: sock})

    def stop_step(self: Arbiter) -> bool:
        """One loop turn of a stop; True once every worker is gone."""
        if not self.pool.workers:
            return True
        if time.monotonic() >= self.stop_deadline:
            log.warning("%d workers still running after the stop timeout: killing them",
                        len(self.pool.workers))
            self.pool.signal_all(signal.SIGKILL)
            self.stop_deadline = float("inf")
        return False

    def cleanup(self: Arbiter) -> None:
        if self.pool.workers:  # leave no orphan behind
            self.pool.signal_all(signal.SIGKILL)
            for pid in list(self.pool.workers):
                _waitpid_quietly(pid)
        self.close_listeners(self.listeners)
        if self.metrics:
            self.metrics.close()
        self.close_balance()
        if self.reload:
            self.close_listeners(self.reload.listeners, keep=self.listeners)
        if self.pid_file_written:
            pidfile.remove(self.cfg.pid_file, self.pid)
            pidfile.remove(self.cfg.pid_file + ".oldbin", self.pid)
        self.board.remove_file_if_ours()
        log.info("master stopped")




def _waitpid_quietly(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
