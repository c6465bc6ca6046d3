"""Playing systemd for a daemon started by a test: the notify socket (sd_notify's other end) and a
start through WRAPPER, which passes a listening socket as fd 3 with LISTEN_PID set to the daemon's
own PID, as socket activation does."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .daemon import Daemon, read_pid
from .timing import scaled, wait_for

# Runs as the daemon's process before exec'ing it: puts TEST_LISTEN_FD on fd 3
# and sets the variables named in TEST_OWN_PID to its PID, which exec keeps.
# They come first in the environment, the order hardest on setproctitle: the
# daemon removes them, and the titles must survive that.
WRAPPER = """
import os, sys
fd = int(os.environ.pop("TEST_LISTEN_FD", "-1"))
if fd >= 0 and fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
names = list(filter(None, os.environ.pop("TEST_OWN_PID", "").split(",")))
env = {name: str(os.getpid()) for name in names}
env.update((k, v) for k, v in os.environ.items() if k not in env)
os.execve(sys.executable, [sys.executable, *sys.argv[1:]], env)
"""


@dataclass
class Message:
    pid: int  # the sender, from SCM_CREDENTIALS
    fields: dict[str, str]
    raw: str
    seq: int
    at: float  # time.monotonic() when received

    def get(self, key: str) -> str | None:
        return self.fields.get(key)


class NotifySocket:
    """systemd's end of sd_notify: receives, and keeps, every datagram."""

    def __init__(self, address: str) -> None:
        self.address = address  # the value for NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[Message] = []

    def receive(self, seconds: float) -> Message | None:
        """The next message, if one arrives within `seconds` (the caller's deadline, scaled already)."""
        readable, _, _ = select.select([self.sock], [], [], max(seconds, 0))
        if not readable:
            return None
        data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _, _ = struct.unpack("iII", payload[:12])
        raw = data.decode()
        fields = dict(line.split("=", 1) for line in raw.split("\n") if "=" in line)
        message = Message(pid, fields, raw, len(self.messages), time.monotonic())
        self.messages.append(message)
        return message

    def wait(self, predicate: Callable[[Message], object], timeout: float = 10.0,
             what: str = "a message", after: Message | None = None) -> Message:
        """The first message (after `after`) that satisfies `predicate`, received by now or soon."""
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        i = after.seq + 1 if after else 0
        while True:
            for message in self.messages[i:]:
                if predicate(message):
                    return message
            i = len(self.messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"received: {[(m.pid, m.raw) for m in self.messages]}")
            self.receive(remaining)

    def collect(self, seconds: float) -> list[Message]:
        """Everything that arrives in the next `seconds` (to show that something does not)."""
        first = len(self.messages)
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.receive(remaining)
        return self.messages[first:]

    def close(self) -> None:
        self.sock.close()


class Wrapped(Daemon):
    """A `lancelotd serve` started through WRAPPER: fd 3 and *_PID variables as systemd sets them."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str], listen: socket.socket | None,
                 own_pid: tuple[str, ...]) -> None:
        self.tmp = tmp
        self.pid_file = tmp / "lancelotd.pid"
        self.log_file = tmp / "lancelotd.log"
        self.config_file = tmp / "lancelotd.toml"
        self.cmd = [sys.executable, "-c", WRAPPER, "-m", "lancelotd", "serve",
                    "--pid-file", str(self.pid_file), *args]
        full_env = dict(os.environ, **env, TEST_OWN_PID=",".join(own_pid))
        full_env.pop("LANCELOTD_CONFIG", None)
        pass_fds: tuple[int, ...] = ()
        if listen is not None:
            full_env["TEST_LISTEN_FD"] = str(listen.fileno())
            pass_fds = (listen.fileno(),)
        self.stderr = open(self.log_file, "ab")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=self.stderr, start_new_session=True, env=full_env,
                                     pass_fds=pass_fds)
        self.port = 0

    def wait_pid_file(self, timeout: float = 10.0) -> int:
        def written() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"lancelotd exited with {self.proc.returncode}:\n{self.log()}")
            return read_pid(self.pid_file) == self.proc.pid or None
        wait_for(written, timeout, "the PID file")
        return self.proc.pid
