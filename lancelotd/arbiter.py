"""The master: binds, forks workers, supervises them, and owns every signal.

Shaped after gunicorn's arbiter and nginx's master loop: signal handlers only
record the signal (the C-level handler writes its number into the wakeup
pipe, which is our queue), and the main loop reads the recorded signals and
dispatches them to handle_<name>().  All real work - logging, reaping,
forking - happens in the loop, never inside a handler.

Generations: every reload starts a new generation of workers with the new
config; only once all of them serve is the old generation retired, so there
is always a generation accepting.  Worker numbers run 1..N per generation.
"""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from setproctitle import setproctitle

from . import logs, pidfile
from .config import Config, ConfigError
from .logs import log
from .scoreboard import DRAINING, FREE, SLOTS, STARTING, STATE_NAMES, Counters, Header, Scoreboard, Slot
from .scoreboard import path_for as scoreboard_path
from .sockets import ACTIVATED, BindError, format_address, open_listeners
from .systemd import Notifier, listen_fds
from .upgrade import ENV_READY_FD, Upgrade, inherited_listeners, launch_successor
from .worker import WorkerSpec, run_worker

if TYPE_CHECKING:
    from .metrics import MetricsServer

# The signal table: every signal the master acts on, and its handler.
SIGNALS = {
    signal.SIGHUP: "hup",  # reload the config: new generation, then retire the old
    signal.SIGTERM: "term",  # graceful stop
    signal.SIGINT: "int",  # fast stop
    signal.SIGQUIT: "quit",  # fast stop
    signal.SIGTTIN: "ttin",  # one worker more
    signal.SIGTTOU: "ttou",  # one worker fewer
    signal.SIGUSR1: "usr1",  # reopen log files
    signal.SIGUSR2: "usr2",  # upgrade: re-exec a new master, hand it the sockets
    signal.SIGCHLD: "chld",  # a child exited: reap it
}
MAX_BACKOFF = 30.0  # cap of the delay between boots of workers that keep dying
KILL_GRACE = 1.0  # how long a stop waits past its timeout before SIGKILL
RELOAD_TIMEOUT = 30.0  # a new generation not serving by then is abandoned
UPGRADE_TIMEOUT = 30.0  # a new master not ready by then is abandoned
STATUS_EVERY = 5.0  # seconds between STATUS= refreshes for systemctl status


class StartError(Exception):
    """The master cannot start; the message says why in one line."""


@dataclass
class WorkerProc:
    pid: int
    number: int
    generation: int
    slot: int
    started: float  # monotonic
    retiring: bool = False  # told to drain; not counted as serving capacity
    killed: bool = False  # killed as hung


@dataclass
class Reload:
    cfg: Config
    generation: int
    listeners: dict[str, socket.socket]
    started: float = field(default_factory=time.monotonic)


class Arbiter:
    def __init__(self, cfg: Config, load_config: Callable[[], Config]) -> None:
        self.cfg = cfg
        self.load_config = load_config  # for reloads: the file plus command-line overrides
        self.pid = os.getpid()
        self.cwd = os.getcwd()  # where a USR2 re-exec runs our command line again
        self.listeners: dict[str, socket.socket] = {}  # configured address -> socket
        self.workers: dict[int, WorkerProc] = {}
        self.generation = 1
        self.target = cfg.workers  # TTIN/TTOU move it; a reload resets it
        self.header = Header(master_pid=self.pid, started=time.time(), generation=1, retired=Counters())
        self.boot_failures = 0
        self.next_spawn = 0.0  # back-off: no spawn before this time
        self.reload: Reload | None = None
        self.reload_queued = False
        self.upgrade: Upgrade | None = None
        self.ready_fd: int | None = None  # set when we are the new master of an upgrade
        self.announced_ready = False
        self.stopping: str | None = None  # None, "graceful", "fast" or "upgraded"
        self.stop_deadline = 0.0
        self.pid_file_written = False
        self.metrics: MetricsServer | None = None

    # --- start ---------------------------------------------------------

    def prepare(self) -> None:
        """Claim the PID file and get the listening sockets (before --daemon detaches)."""
        raise_nofile_limit()
        try:
            if self.cfg.pid_file:
                pidfile.claim(self.cfg.pid_file)
            inherited = inherited_listeners() or {
                ACTIVATED + format_address(sock.getsockname()): sock for sock in listen_fds()}
            self.listeners = open_listeners(self.cfg, inherited)
        except (pidfile.AlreadyRunning, BindError) as e:
            raise StartError(str(e)) from None
        except OSError as e:
            raise StartError(f"cannot use PID file {self.cfg.pid_file}: {e.strerror}") from None
        self.close_listeners(inherited, keep=self.listeners)
        for address, sock in self.listeners.items():
            if address in inherited:
                log.info("listening on %s (inherited)", format_address(sock.getsockname()))

    def start(self) -> None:
        """Write the PID file and prepare the loop, as the process that will run it."""
        self.pid = self.header.master_pid = os.getpid()
        ready_fd = os.environ.pop(ENV_READY_FD, None)
        self.ready_fd = int(ready_fd) if ready_fd else None
        self.notifier = Notifier()
        self.next_status = 0.0
        try:
            self.board = Scoreboard.create(scoreboard_path(self.cfg.pid_file) if self.cfg.pid_file else None)
            if self.cfg.pid_file:
                pidfile.write(self.cfg.pid_file, self.pid)
                self.pid_file_written = True
        except OSError as e:
            self.close_listeners(self.listeners)
            raise StartError(f"cannot write PID file {self.cfg.pid_file}: {e.strerror}") from None
        if self.cfg.metrics_bind:
            try:
                self.metrics = self.open_metrics(self.cfg)
            except BindError as e:
                self.cleanup()
                raise StartError(f"metrics: {e}") from None
        self.events_r, self.events_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._install_signals()
        self.set_title()
        log.info("master started: %d workers, config %s", self.cfg.workers, self.config_name())

    def open_metrics(self, cfg: Config) -> MetricsServer:
        from .metrics import MetricsServer, ScoreboardCollector  # only when asked for: 4 MB less

        collector = ScoreboardCollector(self.board, self.board.read_header, self.pid)
        return MetricsServer(cfg.metrics_bind, 64, collector)

    def _install_signals(self) -> None:
        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.sig_w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, _record_only)

    def config_name(self) -> str:
        return self.cfg.path or "built-in defaults"

    def set_title(self, state: str = "") -> None:
        setproctitle(f"lancelotd: master{state} [{self.config_name()}]")

    # --- the loop ------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the exit code."""
        try:
            self.spawn_missing()
            while True:
                for signum in self.wait():
                    self.dispatch(SIGNALS[signum])
                self.reap()
                if self.stopping:
                    if self.stop_step():
                        return 0
                    continue
                self.check_workers()
                self.check_reload()
                self.check_upgrade()
                self.spawn_missing()
                self.publish()
        finally:
            self.cleanup()

    def wait(self) -> list[int]:
        """Sleep until a signal, a worker event or the next check; the signals received."""
        busy = self.stopping or self.reload or self.upgrade or self.missing() or not self.announced_ready
        watched = [self.sig_r, self.events_r] + ([self.upgrade.ready_r] if self.upgrade else [])
        if self.metrics:
            watched += self.metrics.fds()
        readable, _, _ = select.select(watched, [], [], 0.05 if busy else 0.5)
        if self.metrics:
            self.metrics.handle(readable)
        if self.events_r in readable:
            drain(self.events_r)
        self.notifier.watchdog(time.monotonic())  # only a loop that turns sends it
        if self.upgrade and self.upgrade.ready_r in readable:
            self.upgrade_answered()
        return [signum for signum in drain(self.sig_r) if signum in SIGNALS]

    # --- signal handlers (called from the loop, not from the signal) -------

    def dispatch(self, name: str) -> None:
        if self.stopping and name in ("hup", "ttin", "ttou", "usr2"):
            log.info("%s ignored: stopping", name.upper())
            return
        getattr(self, "handle_" + name)()

    def handle_chld(self) -> None:
        pass  # reap() runs after every wake-up anyway

    def handle_term(self) -> None:
        self.notifier.stopping()
        self.begin_stop("graceful", signal.SIGTERM, self.cfg.graceful_timeout + KILL_GRACE)

    def handle_int(self) -> None:
        self.notifier.stopping()
        self.begin_stop("fast", signal.SIGQUIT, KILL_GRACE)

    handle_quit = handle_int

    def handle_hup(self) -> None:
        if self.reload or self.upgrade:
            self.reload_queued = True  # applied once the one under way is done
            log.info("reload requested while one is under way: queued")
            return
        log.info("reloading %s", self.config_name())
        self.notifier.reloading()
        try:
            cfg = self.load_config()
        except ConfigError as e:
            self.reload_done(False, "config refused: " + "; ".join(e.problems))
            for problem in e.problems:
                log.error("reload refused: %s: %s", e.path, problem)
            return
        try:
            listeners = open_listeners(cfg, self.listeners)
        except BindError as e:
            self.reload_done(False, str(e))
            log.error("reload refused: %s", e)
            return
        try:
            logs.setup(cfg.log_file, cfg.log_level)  # new workers inherit it
        except OSError as e:
            self.close_listeners(listeners, keep=self.listeners)
            self.reload_done(False, f"cannot open log file {cfg.log_file}: {e.strerror}")
            log.error("reload refused: cannot open log file %s: %s", cfg.log_file, e.strerror)
            return
        self.reload = Reload(cfg, self.generation + 1, listeners)
        for number in range(1, cfg.workers + 1):
            self.spawn(number, self.reload.generation, cfg, listeners)

    def handle_ttin(self) -> None:
        if self.target >= SLOTS // 2:
            log.warning("TTIN: already at %d workers, the most a generation may have", self.target)
            return
        self.target += 1
        log.info("TTIN: %d workers", self.target)

    def handle_ttou(self) -> None:
        if self.target <= 1:
            log.info("TTOU: already at 1 worker, the fewest")
            return
        self.target -= 1
        log.info("TTOU: %d workers", self.target)
        for worker in self.serving():
            if worker.number > self.target:
                self.retire(worker)

    def handle_usr1(self) -> None:
        logs.setup(self.cfg.log_file, self.cfg.log_level)
        log.info("log file reopened")
        self.signal_workers(signal.SIGUSR1)

    def handle_usr2(self) -> None:
        if self.upgrade or self.reload:
            log.warning("USR2: an upgrade or reload is under way: ignored")
            return
        self.start_upgrade()

    # --- workers -------------------------------------------------------

    def serving(self) -> list[WorkerProc]:
        """Workers of the current generation that have not been retired."""
        return [w for w in self.workers.values() if w.generation == self.generation and not w.retiring]

    def missing(self) -> list[int]:
        """Worker numbers (1..target) that no serving worker holds."""
        taken = {w.number for w in self.serving()}
        return [n for n in range(1, self.target + 1) if n not in taken]

    def spawn_missing(self) -> None:
        for number in self.missing():
            if time.monotonic() < self.next_spawn:
                return
            self.spawn(number, self.generation, self.cfg, self.listeners)

    def spawn(self, number: int, generation: int, cfg: Config, listeners: dict[str, socket.socket]) -> None:
        try:
            slot = self.board.free_slot()
        except RuntimeError:  # every slot taken by draining generations: wait for them
            log.error("scoreboard full (%d processes): worker %d not spawned yet", SLOTS, number)
            self.next_spawn = time.monotonic() + 1.0
            return
        self.board.write_slot(slot, Slot(state=STARTING, number=number, generation=generation))
        jitter = random.randint(0, cfg.max_requests_jitter) if cfg.max_requests else 0
        spec = WorkerSpec(number, generation, list(listeners.values()), cfg, self.pid, self.board, slot,
                          self.events_w, cfg.max_requests + jitter)
        # Block our signals across fork so none reaches the child while it
        # still has the master's handlers and wakeup pipe.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._become_worker(spec)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.workers[pid] = WorkerProc(pid, number, generation, slot, time.monotonic())
        log.info("spawned worker %d (pid %d, gen %d)", number, pid, generation)

    def _become_worker(self, spec: WorkerSpec) -> None:
        """In the forked child: drop the master's plumbing, serve, and never return."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            for fd in (self.sig_r, self.sig_w, self.events_r, self.ready_fd):
                if fd is not None:
                    os.close(fd)
            others = [*self.listeners.values(), *(self.reload.listeners.values() if self.reload else ())]
            for sock in others:
                if sock not in spec.listeners:
                    sock.close()
            if self.metrics:
                self.metrics.close()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            code = run_worker(spec)
        except BaseException:
            log.exception("worker crashed")
        finally:
            os._exit(code)

    def retire(self, worker: WorkerProc) -> None:
        """Drain a worker: it stops accepting and leaves when its clients have."""
        if not worker.retiring:
            worker.retiring = True
            self.kill(worker.pid, signal.SIGUSR2)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self.worker_exited(worker, status)
            # else: the short-lived launcher of a USR2 successor

    def worker_exited(self, worker: WorkerProc, status: int) -> None:
        slot = self.board.read_slot(worker.slot)
        self.header.retired.add(slot.counters)  # its totals outlive it
        self.board.clear_slot(worker.slot)
        how = describe_status(status)
        name = f"worker {worker.number} (pid {worker.pid}, gen {worker.generation})"
        if self.reload and worker.generation == self.reload.generation and not worker.retiring:
            self.abort_reload(f"new {name} {how} during boot")
            return
        if self.stopping or (worker.retiring and not worker.killed):
            log.info("%s %s", name, how)
            return
        if worker.killed:
            self.header.replaced_hung += 1
        else:
            self.header.replaced_crashed += 1
        if slot.state == STARTING:  # died before it served: back off
            self.boot_failures += 1
            delay = min(0.1 * 2 ** self.boot_failures, MAX_BACKOFF)
            self.next_spawn = time.monotonic() + delay
            log.error("%s %s during boot (%d in a row): next spawn in %.1fs",
                      name, how, self.boot_failures, delay)
        else:
            self.boot_failures = 0
            log.warning("%s %s unexpectedly: replacing it", name, how)

    def check_workers(self) -> None:
        """Kill workers whose loop stopped ticking; notice self-retired ones."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            slot = self.board.read_slot(worker.slot)
            if slot.state == FREE:
                continue  # cannot happen for a live worker's slot; never act on it
            if slot.state == DRAINING and not worker.retiring:
                worker.retiring = True  # max_requests reached: it retired itself
                self.header.recycled += 1
                log.info("worker %d (pid %d) recycled after max_requests", worker.number, worker.pid)
            last_sign = worker.started if slot.state == STARTING else slot.heartbeat
            if not worker.killed and now - last_sign > self.cfg.worker_timeout:
                log.error("worker %d (pid %d) made no progress for %.0fs (%s): killing it",
                          worker.number, worker.pid, now - last_sign, STATE_NAMES[slot.state])
                worker.killed = True
                self.kill(worker.pid, signal.SIGKILL)
        if not self.announced_ready and self.generation_serving(self.generation, self.target):
            self.announce_ready()

    def generation_serving(self, generation: int, count: int) -> bool:
        workers = [w for w in self.workers.values() if w.generation == generation and not w.retiring]
        return len(workers) >= count and all(
            self.board.read_slot(w.slot).state != STARTING for w in workers)

    def announce_ready(self) -> None:
        """Our first workers serve: tell whoever waits for it (USR2's old master)."""
        self.announced_ready = True
        log.info("ready: %d workers serving", self.target)
        self.notifier.ready(self.status_line())
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, b"ready\n")
            except OSError as e:
                log.warning("cannot tell the old master we are ready: %s", e.strerror)
            os.close(self.ready_fd)
            self.ready_fd = None

    def kill(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def signal_workers(self, signum: int) -> None:
        for pid in list(self.workers):
            self.kill(pid, signum)

    def publish(self) -> None:
        """The header for `lancelotd status`; now and then a STATUS= line for systemd."""
        self.header.generation = self.generation
        self.header.workers_target = self.target
        self.header.reload_pending = int(bool(self.reload or self.reload_queued))
        self.header.metrics_port = self.metrics.port if self.metrics else 0
        self.board.write_header(self.header)
        now = time.monotonic()
        if self.notifier.enabled and now >= self.next_status:
            self.next_status = now + STATUS_EVERY
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        answered = self.board.totals().answered
        last = "none"
        if self.header.reloads:
            when = time.strftime("%H:%M:%S", time.localtime(self.header.last_reload))
            last = f"{'ok' if self.header.last_reload_ok else 'FAILED'} at {when}"
            if not self.header.last_reload_ok:
                last += f" ({self.board.read_message()})"
        return (f"gen {self.generation}, {len(self.serving())} workers, {answered} questions answered, "
                f"last reload: {last}")

    # --- reload --------------------------------------------------------

    def check_reload(self) -> None:
        reload = self.reload
        if reload is None:
            return
        if self.generation_serving(reload.generation, reload.cfg.workers):
            self.commit_reload(reload)
        elif time.monotonic() - reload.started > RELOAD_TIMEOUT:
            self.abort_reload(f"the new workers were not serving after {RELOAD_TIMEOUT:.0f}s")

    def commit_reload(self, reload: Reload) -> None:
        old_generation = self.generation
        self.close_listeners(self.listeners, keep=reload.listeners)
        if reload.cfg.metrics_bind != self.cfg.metrics_bind:
            self.move_metrics(reload.cfg)
        self.cfg, self.generation, self.listeners = reload.cfg, reload.generation, reload.listeners
        self.target = reload.cfg.workers
        self.reload = None
        self.publish()  # retiring workers read the current generation here: their hand-off targets
        for worker in list(self.workers.values()):
            if worker.generation != self.generation:
                self.retire(worker)
        self.reload_done(True, f"generation {self.generation} serving")
        log.info("reload done: generation %d serving with %d workers, generation %d retiring",
                 self.generation, self.target, old_generation)
        self.set_title()
        self.run_queued_reload()

    def move_metrics(self, cfg: Config) -> None:
        if self.metrics:
            self.metrics.close()
            self.metrics = None
        if cfg.metrics_bind:
            try:
                self.metrics = self.open_metrics(cfg)
            except BindError as e:
                log.error("metrics: %s; metrics are off until the next reload", e)

    def abort_reload(self, why: str) -> None:
        reload = self.reload
        assert reload is not None
        self.reload = None
        for worker in self.workers.values():
            if worker.generation == reload.generation:
                worker.retiring = True
                self.kill(worker.pid, signal.SIGTERM)
        self.close_listeners(reload.listeners, keep=self.listeners)
        logs.setup(self.cfg.log_file, self.cfg.log_level)
        self.reload_done(False, why)
        log.error("reload failed: %s; generation %d keeps serving", why, self.generation)
        self.run_queued_reload()

    def run_queued_reload(self) -> None:
        if self.reload_queued and not self.stopping:
            self.reload_queued = False
            self.handle_hup()

    def reload_done(self, ok: bool, why: str) -> None:
        self.header.reloads += 1
        self.header.reload_failures += 0 if ok else 1
        self.header.last_reload = time.time()
        self.header.last_reload_ok = int(ok)
        self.board.write_message(why)
        self.publish()
        self.notifier.ready(self.status_line())  # done, or refused: systemd waits for this

    def close_listeners(self, listeners: dict[str, socket.socket],
                        keep: dict[str, socket.socket] | None = None) -> None:
        """Close the sockets in `listeners` that `keep` does not hold too."""
        kept = set(map(id, (keep or {}).values()))
        for address, sock in listeners.items():
            if id(sock) not in kept:
                log.info("no longer listening on %s", address)
                sock.close()

    # --- upgrade (USR2) ------------------------------------------------

    def start_upgrade(self) -> None:
        """Re-exec our command line as a new master that inherits the sockets."""
        pid_file = self.cfg.pid_file
        if pid_file and pidfile.master_process(pid_file + ".oldbin") is not None:
            # Our own predecessor is still draining: its .oldbin must not be lost.
            log.warning("USR2 ignored: the previous master (%s) is still draining",
                        pidfile.read(pid_file + ".oldbin"))
            return
        if pid_file and os.path.exists(pid_file):
            os.replace(pid_file, pid_file + ".oldbin")  # the new master writes its own
        argv = [sys.executable, *sys.orig_argv[1:]]
        self.move_metrics(Config(metrics_bind=""))  # the new master binds it again
        self.upgrade = launch_successor(argv, self.cwd, self.listeners, SIGNALS)
        self.set_title(" (old, upgrading)")
        log.info("upgrade: starting a new master: %s", " ".join(argv))

    def upgrade_answered(self) -> None:
        """Read the new master's news: its PID, then "ready" or an error."""
        upgrade = self.upgrade
        assert upgrade is not None
        for word, rest in upgrade.read_news():
            if word == "pid":
                log.info("upgrade: new master %d started", upgrade.pid)
            elif word == "eof":
                self.upgrade_failed(f"the new master {upgrade.pid or ''} exited before it was ready")
                return
            elif word == "ready":
                self.upgrade_succeeded(upgrade)
                return
            elif word == "error":
                self.upgrade_failed(f"the new master failed: {rest}")
                return

    def upgrade_succeeded(self, upgrade: Upgrade) -> None:
        os.close(upgrade.ready_r)
        self.upgrade = None
        log.info("upgrade: new master %s is ready; retiring our workers", upgrade.pid)
        if upgrade.pid:  # systemd follows the new master as the service's main process
            self.notifier.main_pid(upgrade.pid)
        self.stopping = "upgraded"
        self.stop_deadline = time.monotonic() + self.cfg.graceful_timeout + KILL_GRACE
        self.close_listeners(self.listeners)  # the new master has its own copies
        self.listeners = {}
        for worker in list(self.workers.values()):
            self.retire(worker)
        self.set_title(" (old)")

    def check_upgrade(self) -> None:
        if self.upgrade and time.monotonic() - self.upgrade.started > UPGRADE_TIMEOUT:
            self.abandon_upgrade(f"the new master was not ready within {UPGRADE_TIMEOUT:.0f}s")

    def abandon_upgrade(self, why: str) -> None:
        """Stop a new master that is not ready yet, and keep serving."""
        if self.upgrade and self.upgrade.pid:
            self.kill(self.upgrade.pid, signal.SIGTERM)
        self.upgrade_failed(why)

    def upgrade_failed(self, why: str) -> None:
        upgrade = self.upgrade
        assert upgrade is not None
        self.upgrade = None
        os.close(upgrade.ready_r)
        self.restore_pid_file()
        self.move_metrics(self.cfg)
        self.set_title()
        log.error("upgrade failed: %s; this master keeps serving", why)
        self.run_queued_reload()

    def restore_pid_file(self) -> None:
        pid_file = self.cfg.pid_file
        if pid_file and pidfile.read(pid_file + ".oldbin") == self.pid:
            os.replace(pid_file + ".oldbin", pid_file)

    # --- stopping ------------------------------------------------------

    def begin_stop(self, how: str, worker_signal: int, grace: float) -> None:
        if self.stopping == "fast" or self.stopping == how:
            return
        log.info("%s stop: signalling %d workers", how, len(self.workers))
        if self.upgrade:
            self.abandon_upgrade("stopping")
        self.stopping = how
        self.stop_deadline = time.monotonic() + grace
        self.signal_workers(worker_signal)

    def stop_step(self) -> bool:
        """One loop turn of a stop; True once every worker is gone."""
        if not self.workers:
            return True
        if time.monotonic() >= self.stop_deadline:
            log.warning("%d workers still running after the stop timeout: killing them", len(self.workers))
            self.signal_workers(signal.SIGKILL)
            self.stop_deadline = float("inf")
        return False

    def cleanup(self) -> None:
        if self.workers:  # an exception in the loop: leave no orphan behind
            self.signal_workers(signal.SIGKILL)
            for pid in list(self.workers):
                _waitpid_quietly(pid)
        self.close_listeners(self.listeners)
        if self.metrics:
            self.metrics.close()
        if self.reload:
            self.close_listeners(self.reload.listeners, keep=self.listeners)
        if self.pid_file_written:
            pidfile.remove(self.cfg.pid_file, self.pid)
            pidfile.remove(self.cfg.pid_file + ".oldbin", self.pid)
            self.board.remove_file_if_ours()
        log.info("master stopped")


def drain(fd: int) -> bytes:
    """Everything a non-blocking pipe holds now."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _record_only(signum: int, frame: object) -> None:
    """The wakeup pipe already holds the signal number; nothing else to do."""


def _waitpid_quietly(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: each connection is a descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)
