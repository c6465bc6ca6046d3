"""USR2 binary upgrade: a successor master that inherits our sockets, and a
hand-over that either completes or leaves everything as it was.

The old master forks a short-lived launcher, which forks and execs the same
command line and exits at once: orphaned at birth, the new master is adopted
by init - under systemd by systemd itself, which then supervises it as its
own child once MAINPID= names it (a main process it did not adopt is one
whose stop it does not wait for).

The listening sockets pass as inherited descriptors named in
LANCELOTD_INHERIT_FDS ("fd=address,..."), keyed by the configured address so
the new master reuses exactly the sockets its config still asks for.  The
two masters talk over a socketpair (LANCELOTD_READY_FD; --daemon's launcher
uses the same variable for a pipe that only hears "ready" or "error"):

    launcher -> old   pid N
    new -> old        ready            its workers run, held (they accept nothing); no shared file touched
    old -> new        go               old has kept a link to its scoreboard (for a rollback)
    new -> old        done             new moved its scoreboard into place, wrote the PID file, let its
                                       workers in (they accept from now on)
    old -> new        confirmed        old sent MAINPID=new and wrote PIDFILE.oldbin; it now drains
    new -> old        error REASON     (any time before "done"): it gives up

Until "confirmed" the new master says nothing to systemd: a successor that
fails and stops must not send STOPPING=1 for a service that keeps running.
Anything short of "done" - an error, an exit, UPGRADE_TIMEOUT, or a new master
found dead at "done" - and the old master puts back whatever the new one touched
(PID file, scoreboard), binds its metrics port again and serves on, with the
same MainPID.  Launching is launcher.py; docs/DESIGN.md has the failure matrix.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import pidfile
from .config import Config
from .launcher import Channel, fault, launch_successor
from .logs import log
from .scoreboard import path_for as scoreboard_path
from .spread import NUDGE
from .supervision import KILL_GRACE, kill

if TYPE_CHECKING:
    from .arbiter import Arbiter

UPGRADE_TIMEOUT = 30.0  # a new master not ready by then is abandoned
KILL_WAIT = 1.0  # how long an abandon waits for a SIGKILLed new master to be gone
# After a hand-over our workers drain for graceful_timeout, then flush and
# linger (connections.LINGER_SECONDS each) before they exit: room for both.
DRAIN_GRACE = 2 * 2.0 + KILL_GRACE


@dataclass
class Upgrade:
    """A successor on its way, as the old master sees it."""

    channel: Channel
    pid: int = 0  # the new master's, once the launcher has said it
    went: bool = False  # "go" sent: the new master may have touched the PID file and scoreboard
    started: float = field(default_factory=time.monotonic)


class Upgrades:
    """Both sides of an upgrade, as a part of the master (a mixin of the Arbiter).

    The old side: start_upgrade, upgrade_answered, upgrade_failed.  The new
    side: predecessor_answered (after our own "ready").
    """

    # --- the old master ----------------------------------------------------

    def start_upgrade(self: Arbiter) -> None:
        """Re-exec our command line as a new master that inherits the sockets."""
        if os.getpid() == 1:
            log.error("USR2 refused: this master is PID 1 (a container without an init?), and a new "
                      "master would die with it; restart the container to upgrade, or run an init")
            return
        pid_file = self.cfg.pid_file
        if pid_file and pidfile.master_process(pid_file + ".oldbin") is not None:
            # Our own predecessor is still draining: its .oldbin must not be lost.
            log.warning("USR2 ignored: the previous master (%s) is still draining",
                        pidfile.read(pid_file + ".oldbin"))
            return
        argv = [sys.executable, *sys.orig_argv[1:]]
        self.move_metrics(Config(metrics_bind=""))  # the new master binds it again
        self.move_agent(Config(agent_bind=""))  # the same
        try:
            self.upgrade = Upgrade(launch_successor(argv, self.cwd, self.listeners, self.signal_table()))
        except OSError as e:
            self.move_metrics(self.cfg)
            self.move_agent(self.cfg)
            log.error("USR2 refused: cannot start a new master: %s", e.strerror)
            return
        self.set_title(" (upgrading)")
        log.info("upgrade: starting a new master: %s", " ".join(argv))

    def upgrade_answered(self: Arbiter) -> None:
        """Read the new master's news and take the next step of the hand-over."""
        upgrade = self.upgrade
        assert upgrade is not None
        for word, rest in upgrade.channel.read():
            if word == "pid" and rest.isdigit():
                upgrade.pid = int(rest)
                log.info("upgrade: new master %d started", upgrade.pid)
            elif word == "ready":
                self.let_successor_in(upgrade)
            elif word == "done":
                self.hand_over(upgrade)
                return
            elif word == "error":
                self.upgrade_failed(f"the new master failed: {rest}")
                return
            elif word == "eof":
                self.upgrade_failed(f"the new master {upgrade.pid or ''} exited before it was ready")
                return

    def let_successor_in(self: Arbiter, upgrade: Upgrade) -> None:
        """It serves: let it take the PID file and scoreboard, keeping ours for a rollback."""
        if self.board.path:
            try:
                self.board.keep_link(scoreboard_path(self.cfg.pid_file + ".oldbin"))
            except OSError as e:  # a full or read-only /run: no rollback possible, so no hand-over
                self.abandon_upgrade(f"cannot keep a link to our scoreboard: {e.strerror}")
                return
        upgrade.went = True
        log.info("upgrade: new master %s serves: letting it take over", upgrade.pid)
        if not upgrade.channel.say("go"):
            self.upgrade_failed("the new master went away")

    def hand_over(self: Arbiter, upgrade: Upgrade) -> None:
        """The new master has the files: systemd follows it, and we drain."""
        if fault("after-done"):  # the tests: let the new master's death happen before our look
            time.sleep(0.3)
        if upgrade.pid and not alive(upgrade.pid):  # died in the instant after "done": nobody to follow
            self.upgrade_failed(f"the new master {upgrade.pid} died right after it took the files")
            return
        self.upgrade = None
        if self.cfg.pid_file:
            try:
                pidfile.write(self.cfg.pid_file + ".oldbin", self.pid)
            except OSError as e:
                log.warning("cannot write %s.oldbin: %s", self.cfg.pid_file, e.strerror)
        if upgrade.pid:
            self.notifier.main_pid(upgrade.pid)
        self.notifier.muted = True  # from now on the new master speaks for the service
        upgrade.channel.say("confirmed")
        upgrade.channel.close()
        log.info("upgrade: new master %s is ready; retiring our workers", upgrade.pid)
        self.begin_stop("upgraded", signal.SIGUSR2, self.cfg.graceful_timeout + DRAIN_GRACE)
        self.set_title(" (old)")

    def check_upgrade(self: Arbiter) -> None:
        timeout = upgrade_timeout()
        if self.upgrade and time.monotonic() - self.upgrade.started > timeout:
            self.abandon_upgrade(f"the new master was not ready within {timeout:g}s")

    def abandon_upgrade(self: Arbiter, why: str) -> None:
        """Stop a new master that has not taken over, and keep serving.

        Before "go" it has touched nothing shared and its workers accept nothing: TERM.  After
        "go" it may be taking the files at this very moment, and nothing it does may come after
        our rollback: SIGKILL, and the rollback once it is gone.  Its workers, orphaned, retire
        and hand whatever they hold to the scoreboard's current generation: ours, by then.
        """
        upgrade = self.upgrade
        if upgrade and upgrade.pid:
            if upgrade.went:
                kill(upgrade.pid, signal.SIGKILL)
                if not wait_gone(upgrade.pid, KILL_WAIT):
                    log.error("upgrade: the new master %d outlived SIGKILL for %gs", upgrade.pid, KILL_WAIT)
            else:
                kill(upgrade.pid, signal.SIGTERM)
        self.upgrade_failed(why)

    def upgrade_failed(self: Arbiter, why: str) -> None:
        """Put back what the new master may have touched; serve on as before the USR2."""
        upgrade = self.upgrade
        assert upgrade is not None
        self.upgrade = None
        self.shared_with = upgrade.pid  # it may still hold our sockets while it stops
        upgrade.channel.close()
        if upgrade.went:
            self.restore_files()
        if upgrade.pid and self.cfg.pid_file:  # what a successor killed before its cleanup leaves
            pid_file = self.cfg.pid_file
            record = pidfile.record_path(pid_file, upgrade.pid)
            for path in (scoreboard_path(f"{pid_file}.new-{upgrade.pid}"), record,
                         f"{record}.{upgrade.pid}.tmp", f"{pid_file}.{upgrade.pid}.tmp"):
                remove_quietly(path)
        self.move_metrics(self.cfg)
        self.move_agent(self.cfg)
        self.set_title()
        self.last_upgrade = f"upgrade FAILED at {time.strftime('%H:%M:%S')} ({why})"
        log.error("upgrade failed: %s; this master keeps serving", why)
        self.notifier.status(self.status_line())
        self.run_queued_reload()

    def restore_files(self: Arbiter) -> None:
        pid_file = self.cfg.pid_file
        if not pid_file:
            return
        try:
            if pidfile.read(pid_file) != self.pid:
                pidfile.write(pid_file, self.pid)
            self.board.restore_link(scoreboard_path(pid_file + ".oldbin"))
        except OSError as e:
            log.error("cannot restore the PID file or scoreboard after the failed upgrade: %s", e.strerror)

    # --- the new master ----------------------------------------------------

    def predecessor_answered(self: Arbiter) -> None:
        """The old master's word after our "ready": take the files when told, speak once confirmed."""
        channel = self.predecessor
        assert channel is not None
        for word, _ in channel.read():
            if word == "go":
                if fault("before-files"):
                    os._exit(3)
                if fault("slow-go"):
                    time.sleep(float(os.environ.get("LANCELOTD_TEST_SLOW_GO", "3")))
                try:
                    if fault("files-error"):
                        raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
                    self.take_files()
                except OSError as e:  # the old master puts back whatever we managed to take
                    why = f"cannot take the PID file and scoreboard: {e.strerror}"
                    channel.say(f"error {why}")
                    self.predecessor = None
                    channel.close()
                    log.error("upgrade: %s: stopping", why)
                    self.begin_stop("fast", signal.SIGQUIT, KILL_GRACE)
                    return
                if fault("after-go"):
                    os._exit(3)
                self.let_workers_in()
                channel.say("done")
                if fault("after-done"):
                    os._exit(3)
            elif word == "confirmed" or (word == "eof" and self.pid_file_written):
                self.become_the_master()
                return
            elif word == "eof":  # before it let us in: it gave up on us, or it is gone
                if alive(self.predecessor_pid):
                    log.warning("upgrade: the old master gave up on us before the hand-over: stopping")
                    self.predecessor = None
                    channel.close()
                    self.begin_stop("fast", signal.SIGQUIT, KILL_GRACE)  # held workers: no client
                else:
                    log.warning("upgrade: the old master %d died before the hand-over: taking over",
                                self.predecessor_pid)
                    try:
                        self.take_files()
                    except OSError as e:  # serve all the same: nobody else will
                        log.error("cannot take the PID file and scoreboard: %s; serving without them",
                                  e.strerror)
                    self.become_the_master()
                return

    def become_the_master(self: Arbiter) -> None:
        """Confirmed (or the old master is gone): from now on we speak to systemd."""
        assert self.predecessor is not None
        self.predecessor.close()
        self.predecessor = None
        self.shared_with = 0  # the old master has released our sockets (or is gone)
        self.let_workers_in()
        self.notifier.muted = False
        self.notifier.main_pid(self.pid)  # already said by the old master, unless it died
        self.notifier.ready(self.status_line())
        log.info("upgrade: this is the master now")

    def let_workers_in(self: Arbiter) -> None:
        """Let in by the old master (or its successor now): our workers accept from now on."""
        if self.header.accepts_held:
            self.header.accepts_held = 0
            self.publish()  # the header first: a worker checks it when nudged
            self.pool.signal_all(NUDGE)
            log.info("upgrade: let in: our workers accept new connections")

    def take_files(self: Arbiter) -> None:
        """Our scoreboard into its public place, then our PID in the PID file."""
        if not self.cfg.pid_file:
            return
        self.board.move_to(scoreboard_path(self.cfg.pid_file))
        pidfile.write(self.cfg.pid_file, self.pid)
        self.pid_file_written = True


def upgrade_timeout() -> float:
    """UPGRADE_TIMEOUT, or the tests' shorter LANCELOTD_TEST_UPGRADE_TIMEOUT."""
    try:
        return float(os.environ.get("LANCELOTD_TEST_UPGRADE_TIMEOUT", UPGRADE_TIMEOUT))
    except ValueError:
        return UPGRADE_TIMEOUT


def wait_gone(pid: int, patience: float) -> bool:
    """Wait (blocking, briefly) until `pid` has exited; False if it is still there after `patience`."""
    deadline = time.monotonic() + patience
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphaned master's reaper may not have reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # no /proc: kill()'s word stands
        return True
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")
