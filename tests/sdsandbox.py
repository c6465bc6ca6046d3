"""A real systemd for the tests: PID 1 of private namespaces on a throw-away root.

The machine's own /lib/systemd/systemd (or, with `lower=DIR`, that of the OS tree in DIR, such
as a Debian 12 root made by mmdebstrap) boots as PID 1 of new pid, mount, uts,
ipc, cgroup and (by default) network namespaces, on an overlay whose lower
layer is the host's / and whose every write lands in a tmpfs.  It reaches
`running` in well under a second; powering it off (SIGRTMIN+4) takes about
0.2 s and leaves nothing behind: no mount outside its mount namespace, no
file outside its state directory, and its cgroup is removed.

    with booted() as sb:                      # or Sandbox(...).boot() / .teardown()
        sb.run("systemctl", "start", "x")     # a command inside (all its namespaces)
        sb.net_popen(["loadgen", ...])        # a host program in its network only
        sb.root / "etc/systemd/system"        # its file system, from the host

Design (the steps that must run as PID 1 are in sdsandbox.sh):

* `unshare --pid --fork --kill-child ...` runs `sdsandbox.sh stage1` on a pty
  of ours, which becomes the sandbox's /dev/console (systemd writes only to a
  tty); a thread copies it to console.log.  stage1 moves itself into a cgroup
  of its own and unshares the cgroup namespace, so systemd sees that cgroup as
  "/"; stage2 builds the overlay root and the API file systems, pivots and
  execs systemd with a reduced capability bounding set.
* The launcher gets PR_SET_PDEATHSIG=SIGKILL (setpriv --pdeathsig) and passes
  SIGKILL on to systemd (--kill-child): if the test run itself is killed, the
  whole sandbox dies with it.  Only its empty cgroup stays; the next session
  sweeps those (sdsandbox.sh sweep).
* Names are unique per session (pid + random), so sessions run side by side.
* A private network namespace by default: the sandbox's port 1060 collides
  with nothing on the host, and tests talk to it from inside, or run a host
  program in its network namespace (net_popen).

Root only (namespaces, mounts); `unavailable()` says why not.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from helpers import scaled

SCRIPT = Path(__file__).resolve().with_name("sdsandbox.sh")
SYSTEMD = "/lib/systemd/systemd"
CGROUP_PREFIX = "sdsb-lancelotd-"
MARKER = ".lancelotd-sdsandbox"
TOOLS = ("unshare", "nsenter", "setpriv", "setsid", "mount", "umount", "pivot_root", "find")
# Commands inside run with this environment only; nothing of the host's leaks in.
INSIDE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
              "LANG=C.UTF-8", "TERM=dumb", "SYSTEMD_PAGER=cat", "PAGER=cat", "SYSTEMD_COLORS=0",
              "SYSTEMD_LESS=")


class SandboxError(Exception):
    pass


def unavailable() -> str | None:
    """Why no sandbox can run here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "the systemd sandbox needs root (it creates namespaces and mounts)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"no systemd binary at {SYSTEMD}"
    return None


class Sandbox:
    def __init__(self, state_dir: Path | None = None, private_net: bool = True,
                 boot_timeout: float = 60.0, lower: Path | None = None) -> None:
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.cgroup = CGROUP_PREFIX + self.name
        parent = Path(state_dir) if state_dir else Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        self.state = Path(tempfile.mkdtemp(prefix=f"sdsb-{self.name}-", dir=parent))
        (self.state / MARKER).touch()
        self.private_net = private_net
        self.lower = Path(lower) if lower else None  # another OS tree as the root, else the host's
        self.boot_timeout = boot_timeout
        self.pid: int | None = None  # host PID of the sandbox's systemd
        self.launcher: subprocess.Popen[bytes] | None = None
        self._pty: int | None = None
        self._drain: threading.Thread | None = None
        self._console: list[bytes] = []
        self.down = False

    # --- boot and teardown -------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "SDSB_STATE_DIR": str(self.state), "SDSB_CGROUP": self.cgroup,
                "SDSB_PRIVATE_NET": "1" if self.private_net else "0", "SDSB_SYSTEMD": SYSTEMD,
                "SDSB_LOWER": str(self.lower or "/")}

    def boot(self) -> Sandbox:
        """Start systemd and wait until it is `running` (or `degraded`); SandboxError if not."""
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise SandboxError(f"missing tools {missing} (apt-get install util-linux mount findutils)")
        self._sweep()
        namespaces = ["--pid", "--fork", "--kill-child", "--mount", "--uts", "--ipc",
                      "--propagation", "private"] + (["--net"] if self.private_net else [])
        master, slave = os.openpty()
        self._pty = master
        try:
            self.launcher = subprocess.Popen(
                ["setsid", "--ctty", "setpriv", "--pdeathsig", "KILL", "--",
                 "unshare", *namespaces, "--", "/bin/bash", str(SCRIPT), "stage1"],
                stdin=slave, stdout=slave, stderr=slave, env=self.env, close_fds=True)
        finally:
            os.close(slave)
        self._drain = threading.Thread(target=self._copy_console, name=f"sdsb-{self.name}", daemon=True)
        self._drain.start()
        deadline = time.monotonic() + scaled(self.boot_timeout)
        state = ""
        while True:
            if self.launcher.poll() is not None:
                self.teardown()
                raise SandboxError(f"the sandbox died during boot (exit {self.launcher.returncode}):\n"
                                   + self.console())
            self.pid = self._systemd_pid()
            if self.pid:
                state = self.run("systemctl", "is-system-running", timeout=10).stdout.strip()
                if state in ("running", "degraded"):
                    return self
            if time.monotonic() > deadline:
                self.teardown()
                raise SandboxError(f"systemd was not running after {scaled(self.boot_timeout):g}s "
                                   f"(state {state!r}):\n" + self.console())
            time.sleep(0.05)

    def teardown(self, journal_to: Path | None = None) -> None:
        """Power off (SIGKILL if that hangs), reap, remove the cgroup and the state dir.

        Safe to call twice, and after a failed boot.
        """
        if self.down:
            return
        pid = self._systemd_pid()
        if pid and journal_to is not None:
            try:
                journal = self.run("journalctl", "-b", "--no-pager", "-o", "short-precise", timeout=20)
                Path(journal_to).write_text(journal.stdout + journal.stderr)
            except (OSError, subprocess.SubprocessError):
                pass
        self.down = True
        if pid:
            _kill(pid, signal.SIGRTMIN + 4)  # systemd: poweroff
        if self.launcher is not None:
            try:
                self.launcher.wait(scaled(20))
            except subprocess.TimeoutExpired:
                if pid:
                    _kill(pid, signal.SIGKILL)  # the whole pid namespace goes with it
                self.launcher.kill()
                self.launcher.wait()
        if self._drain is not None:
            self._drain.join(scaled(5))
        if self._pty is not None:
            os.close(self._pty)
            self._pty = None
        self.pid = None
        problems = []
        removed = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                                  "/bin/bash", str(SCRIPT), "rmcgroup"],
                                 env=self.env, capture_output=True, text=True, timeout=scaled(30))
        if removed.returncode != 0:
            problems.append(f"cgroup {self.cgroup}: {removed.stderr.strip()}")
        if (self.state / MARKER).exists():
            shutil.rmtree(self.state, ignore_errors=True)
        if problems:
            raise SandboxError("; ".join(problems))

    def _systemd_pid(self) -> int | None:
        """The host PID of the sandbox's systemd once it has exec'd, else None."""
        try:
            pid = int((self.state / "pid").read_text())
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            comm_ok = stat[stat.index("(") + 1:stat.rindex(")")] == "systemd"
            alive = stat[stat.rindex(")") + 2] != "Z"
            other_ns = os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        except (OSError, ValueError):
            return None
        return pid if comm_ok and alive and other_ns else None

    def _sweep(self) -> None:
        """Remove the empty cgroups of sandboxes whose session was killed."""
        subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                        "/bin/bash", str(SCRIPT), "sweep", CGROUP_PREFIX],
                       env=self.env, capture_output=True, timeout=scaled(30))

    def _copy_console(self) -> None:
        assert self._pty is not None
        fd = self._pty
        with open(self.state / "console.log", "ab") as log:
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: every holder of the pty's other end is gone
                    return
                if not data:
                    return
                self._console.append(data)
                log.write(data)
                log.flush()

    def console(self) -> str:
        """What the sandbox printed on its console (boot and shutdown lines, stage errors)."""
        return b"".join(self._console).decode("utf-8", "replace")

    # --- using it ------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The sandbox's / seen from the host (writes land in its overlay)."""
        return Path(f"/proc/{self._live_pid()}/root")

    def _live_pid(self) -> int:
        if self.pid is None or self.down:
            raise SandboxError("the sandbox is not running")
        return self.pid

    def inside(self, cmd: Sequence[str]) -> list[str]:
        """The command line that runs `cmd` inside: every namespace, its root, a clean environment."""
        return ["nsenter", "--target", str(self._live_pid()), "--all", "--",
                "/usr/bin/env", "-i", *INSIDE_ENV, *cmd]

    def run(self, *cmd: str, input: str | None = None, timeout: float = 60.0,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a command inside and wait for it (within scaled(`timeout`)); stdout and stderr captured
        as text."""
        result = subprocess.run(self.inside(cmd), input=input, capture_output=True, text=True,
                                timeout=scaled(timeout))
        if check and result.returncode != 0:
            raise SandboxError(f"{' '.join(cmd)} exited with {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def net_popen(self, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen:
        """Start a host program (host files, host environment) in the sandbox's network only."""
        return subprocess.Popen(["nsenter", "--target", str(self._live_pid()), "--net", "--", *cmd],
                                **kwargs)  # type: ignore[call-overload]

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the sandbox (into its overlay)."""
        self.run("install", "-D", "-m", f"{mode:o}", "/dev/stdin", path, input=text, check=True)

    def systemctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p ...` as a dict."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props), check=True)
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def booted(state_dir: Path | None = None, private_net: bool = True,
           journal_to: Path | None = None, lower: Path | None = None) -> Iterator[Sandbox]:
    """A running sandbox for the block; powered off and removed afterwards, whatever happens."""
    sandbox = Sandbox(state_dir, private_net, lower=lower)
    try:
        yield sandbox.boot()
    finally:
        sandbox.teardown(journal_to)
