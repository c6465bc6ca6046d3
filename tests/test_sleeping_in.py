"""helpers.sleeping_in, the readiness signal "this process sleeps in that system call": both of
its ways (the kernel's wait channel, and /proc/PID/syscall where kernel symbols are hidden)
must see a real sleeper, and tell one call from another."""

from __future__ import annotations

import subprocess
import sys

from helpers import scaled, sleeping_in, syscall_is, wait_for


def test_a_sleeping_process_is_seen_in_nanosleep_both_ways():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        wait_for(lambda: sleeping_in(sleeper.pid, "nanosleep"), 10, "the sleeper in nanosleep (wchan)")
        wait_for(lambda: syscall_is(sleeper.pid, "nanosleep"), 10, "the sleeper in nanosleep (syscall)")
        assert not sleeping_in(sleeper.pid, "epoll_wait") and not syscall_is(sleeper.pid, "epoll_wait")
    finally:
        sleeper.kill()
        sleeper.wait(scaled(10))
    assert not syscall_is(sleeper.pid, "nanosleep")  # gone: False, not an error
