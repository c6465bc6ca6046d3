"""systemd integration: sd_notify messages and socket activation (docs/PROMISES.md §5).

Both are a few lines of protocol (sd_notify(3), sd_listen_fds(3)); there is no
maintained library worth a dependency, so they are ours.  Everything here is
a no-op when systemd did not start us.
"""

from __future__ import annotations

import os
import socket
import time

from .logs import log

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify datagrams to $NOTIFY_SOCKET; does nothing without it."""

    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET", "")
        self.sock: socket.socket | None = None
        if self.address:
            if self.address.startswith("@"):  # abstract namespace
                self.address = "\0" + self.address[1:]
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval = watchdog_interval()
        self.next_watchdog = 0.0
        # A USR2 successor is muted until the old master has handed it the
        # service; an old master, once it has.  Only one master speaks.
        self.muted = False

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, *fields: str) -> None:
        """Send "KEY=value" lines in one datagram; errors are logged, never raised."""
        if self.sock is None or self.muted:
            return
        try:
            self.sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
        except OSError as e:
            log.warning("sd_notify to %r failed: %s", self.address, e.strerror)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                    "STATUS=reloading")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def main_pid(self, pid: int) -> None:
        self.notify(f"MAINPID={pid}")

    def watchdog(self, now: float) -> None:
        """WATCHDOG=1 every half WatchdogSec; called from a healthy master loop only."""
        if self.watchdog_interval and now >= self.next_watchdog:
            self.notify("WATCHDOG=1")
            self.next_watchdog = now + self.watchdog_interval / 2


def watchdog_interval() -> float:
    """Seconds of WatchdogSec= meant for this process, or 0.

    Once WATCHDOG_PID is known to name us, it goes: a USR2 successor inherits
    our environment and becomes the main process (MAINPID=), so the pings are
    its job then; with our PID still in WATCHDOG_PID it would never send one,
    and systemd would kill the upgraded service after WatchdogSec.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    os.environ.pop("WATCHDOG_PID", None)
    return int(usec) / 1e6


def listen_fds() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_FDS), meant for us.

    The variables are removed either way, so neither workers nor a re-exec'd
    master mistake them for their own.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets
