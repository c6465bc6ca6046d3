"""The master: binds, forks workers, supervises them, and owns every signal.

Shaped after gunicorn's arbiter and nginx's master loop: signal handlers only
record the signal (the C-level handler writes its number into the wakeup
pipe, which is our queue), and the main loop reads the recorded signals and
dispatches them to handle_<name>().  All real work - logging, reaping,
forking - happens in the loop, never inside a handler.

The master's rooms: this module is the loop and the signal table; stopping.py stopping;
supervision.py the rules workers are judged by (exit causes, back-off, hang
detection, readiness); generations.py reloads; upgrade.py USR2.

Error policy (nginx's "log it and continue"): an exception in a signal
handler or a loop turn is logged with its traceback and supervision goes on;
only a real stop ends the loop and cleans up.  docs/DESIGN.md has the
processes, the control channels and the state tables.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from setproctitle import setproctitle

from . import logs, pidfile
from .balancer import Balance, Balancing
from .config import MAX_WORKERS, Config
from .generations import Generations, Reload
from .launcher import ENV_PREDECESSOR, ENV_READY_FD, Channel, inherited_listeners
from .limits import nofile_advice, raise_nofile_limit
from .logs import log
from .reporting import Reporting
from .scoreboard import SLOTS, Counters, Header, Scoreboard
from .scoreboard import path_for as scoreboard_path
from .sockets import ACTIVATED, BindError, format_address, open_listeners
from .spread import make_loads
from .stopping import Stopping
from .strays import StrayLog
from .supervision import KILL_GRACE, Pool, Supervision
from .systemd import Notifier, listen_fds
from .upgrade import Upgrade, Upgrades

if TYPE_CHECKING:
    from .clients import ClientTable
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
ERROR_PAUSE = 0.1  # after a failed loop turn, so a persistent fault cannot spin the master


class StartError(Exception):
    """The master cannot start; the message says why in one line."""


class Arbiter(Supervision, Generations, Upgrades, Reporting, Balancing, Stopping):
    def __init__(self, cfg: Config, load_config: Callable[[], Config]) -> None:
        self.cfg = cfg
        self.load_config = load_config  # for reloads: the file plus command-line overrides
        self.pid = os.getpid()
        self.cwd = os.getcwd()  # where a USR2 re-exec runs our command line again
        self.listeners: dict[str, socket.socket] = {}  # configured address -> socket
        self.generation = 1
        self.target = cfg.workers  # TTIN/TTOU move it; a reload resets it
        self.header = Header(master_pid=self.pid, started=time.time(), generation=1, retired=Counters())
        self.reload: Reload | None = None
        self.reload_queued = False
        self.upgrade: Upgrade | None = None
        self.ready_fd: int | None = None  # whoever waits for us to serve: --daemon's launcher, an old master
        self.predecessor: Channel | None = None  # the old master, while we are its USR2 successor
        self.predecessor_pid = 0
        # The other master of a USR2 upgrade that holds our listening sockets too: the predecessor
        # we inherited them from until it confirms, a successor that failed until it is gone.
        # Sockets another master holds are closed at a stop, never filtered (begin_stop).
        self.shared_with = 0
        self.last_upgrade = ""
        self.announced_ready = False
        self.stopping: str | None = None  # None, "graceful", "fast" or "upgraded"
        self.stop_deadline = 0.0
        self.pid_file_written = False
        self.metrics: MetricsServer | None = None
        self.clients: ClientTable | None = None  # per-client counts (clients.py), made when first needed
        self.loads = make_loads(SLOTS)  # each worker's live connections, to spread accepts (spread.py)
        self.balance = Balance()  # the agent port, the drain state, drain_delay (balancer.py)
        self.failed_turns = 0  # loop turns in a row that raised
        self.strays = StrayLog()  # signals with no meaning here: logged and ignored (strays.py)

    # --- start ---------------------------------------------------------

    def prepare(self) -> None:
        """Claim the PID file and get the listening sockets (before --daemon detaches)."""
        raise_nofile_limit()
        try:
            if self.cfg.pid_file and ENV_PREDECESSOR not in os.environ:  # a successor shares it, for now
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
        self.warn_about_limits(self.cfg)

    def start(self) -> None:
        """Write the PID file and prepare the loop, as the process that will run it."""
        self.pid = self.header.master_pid = os.getpid()
        ready_fd = os.environ.pop(ENV_READY_FD, None)
        self.ready_fd = int(ready_fd) if ready_fd else None
        predecessor = os.environ.pop(ENV_PREDECESSOR, "")
        self.notifier = Notifier()
        if predecessor.isdigit() and self.ready_fd is not None:
            self.predecessor_pid = int(predecessor)
            self.predecessor = Channel(self.ready_fd)
            os.set_blocking(self.ready_fd, False)
            self.notifier.muted = True  # until the old master has handed us the service
            self.shared_with = self.predecessor_pid
            self.header.accepts_held = 1  # until it lets us in (upgrade.py)
        self.next_status = 0.0
        self.set_title()  # before the PID file names us: readers check the title
        try:
            self.events_r, self.events_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.board = Scoreboard.create(self.board_path())
        except OSError as e:
            self.close_listeners(self.listeners)
            where = f" beside {self.cfg.pid_file}" if self.cfg.pid_file else ""
            raise StartError(f"cannot create the scoreboard{where}: {e.strerror}") from None
        self.pool = Pool(self.board)
        try:
            if self.cfg.pid_file and not self.predecessor:  # a successor writes it once let in
                pidfile.write(self.cfg.pid_file, self.pid)
                self.pid_file_written = True
        except OSError as e:
            self.board.remove_file_if_ours()
            self.close_listeners(self.listeners)
            raise StartError(f"cannot write PID file {self.cfg.pid_file}: {e.strerror}") from None
        if self.cfg.metrics_bind:
            try:
                self.metrics = self.open_metrics(self.cfg)
            except BindError as e:
                self.cleanup()
                raise StartError(f"metrics: {e}") from None
        try:
            self.open_balance()
        except BindError as e:
            self.cleanup()
            raise StartError(f"agent: {e}") from None
        self._install_signals()
        self.publish()  # before the first fork: a held worker reads accepts_held here
        log.info("master started: %d workers, config %s", self.cfg.workers, self.config_name())

    def board_path(self) -> str | None:
        """Beside the PID file; a USR2 successor's stays private until the old master lets it in."""
        if not self.cfg.pid_file:
            return None
        if self.predecessor:
            return scoreboard_path(f"{self.cfg.pid_file}.new-{self.pid}")
        return scoreboard_path(self.cfg.pid_file)

    def _install_signals(self) -> None:
        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.sig_w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, _record_only)
        self.strays.block()  # read once a turn and logged: no stray signal ends the master

    def signal_table(self) -> list[int]:
        return list(SIGNALS)

    def config_name(self) -> str:
        return self.cfg.path or "built-in defaults"

    def set_title(self, state: str = "") -> None:
        setproctitle(f"lancelotd: master{state} [{self.config_name()}]")

    def warn_about_limits(self, cfg: Config) -> None:
        advice = nofile_advice(cfg.max_connections, cfg.workers)
        if advice:
            log.warning("%s", advice)

    # --- the loop ------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the exit code."""
        try:
            self.guarded(lambda _: self.spawn_missing(), "the first spawn")
            while True:
                try:
                    if self.turn():
                        return 0
                    self.failed_turns = 0
                except Exception:
                    self.turn_failed()
        finally:
            self.cleanup()

    def turn(self) -> bool:
        """One turn of the loop; True once a stop is complete."""
        for signum in self.wait():
            self.guarded(self.dispatch, SIGNALS[signum].upper())
        self.strays.collect()
        self.reap()
        self.check_balance()
        if self.stopping:
            return self.stop_step()
        self.check_workers()
        self.check_reload()
        self.check_upgrade()
        self.spawn_missing()
        self.publish()
        return False

    def guarded(self, action: Callable[[str], None], name: str) -> None:
        """Run one signal's handler; an exception is logged, and the other signals still run."""
        try:
            action(name)
        except Exception:
            log.exception("unexpected error handling %s; supervision goes on", name)

    def turn_failed(self) -> None:
        self.failed_turns += 1
        if self.failed_turns in (1, 10, 100) or self.failed_turns % 1000 == 0:
            log.exception("unexpected error in the master loop (%d in a row); supervision goes on",
                          self.failed_turns)
        time.sleep(ERROR_PAUSE)

    def wait(self) -> list[int]:
        """Sleep until a signal, a worker event or the next check; the signals received."""
        busy = (self.stopping or self.reload or self.upgrade or self.missing_any()
                or not self.announced_ready or self.balance.stop_at)
        watched = [self.sig_r, self.events_r]
        watched += [self.upgrade.channel.fd] if self.upgrade else []
        watched += [self.predecessor.fd] if self.predecessor else []
        sending = self.metrics.write_fds() if self.metrics else []
        if self.metrics:
            watched += self.metrics.fds()
        watched += self.balance_fds()
        readable, writable, _ = select.select(watched, sending, [], 0.05 if busy else 0.5)
        if self.metrics:
            self.metrics.handle(readable, writable)
        self.serve_balance(readable)
        if self.events_r in readable:
            drain(self.events_r)
        self.notifier.watchdog(time.monotonic())  # only a loop that turns sends it
        if self.upgrade and self.upgrade.channel.fd in readable:
            self.upgrade_answered()
        if self.predecessor and self.predecessor.fd in readable:
            self.predecessor_answered()
        return [signum for signum in drain(self.sig_r) if signum in SIGNALS]

    # --- signal handlers (called from the loop, not from the signal) -------

    def dispatch(self, name: str) -> None:
        if (self.stopping or self.balance.stop_at) and name in ("HUP", "TTIN", "TTOU", "USR2"):
            log.info("%s ignored: stopping", name)
            return
        if name == os.environ.get("LANCELOTD_TEST_FAULT_SIGNAL"):  # fault injection for the tests
            raise RuntimeError(f"injected fault in the {name} handler")
        getattr(self, "handle_" + name.lower())()

    def handle_chld(self) -> None:
        pass  # reap() runs after every wake-up anyway

    def handle_term(self) -> None:
        if self.header.accepts_held:  # a USR2 successor not let in: its workers hold no client
            log.info("TERM before the old master let us in: nothing to finish")
            self.begin_stop("fast", signal.SIGQUIT, KILL_GRACE)
            return
        if self.delay_stop():  # drain_delay: the balancer is told first, the stop comes later
            return
        self.begin_stop("graceful", signal.SIGTERM, self.cfg.graceful_timeout + KILL_GRACE)

    def handle_int(self) -> None:
        self.begin_stop("fast", signal.SIGQUIT, KILL_GRACE)

    handle_quit = handle_int

    def handle_hup(self) -> None:
        if self.reload or self.upgrade:
            self.reload_queued = True  # applied once the one under way is done
            log.info("reload requested while one is under way: queued")
            return
        self.begin_reload()

    def handle_ttin(self) -> None:
        if self.target >= MAX_WORKERS:
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
        for worker in self.pool.serving(self.generation):
            if worker.number > self.target:
                self.retire(worker)

    def handle_usr1(self) -> None:
        if logs.reopen(self.cfg.log_file, self.cfg.log_level):  # if not, it logged why
            log.info("log file reopened")
        self.pool.signal_all(signal.SIGUSR1)  # each worker tries for itself

    def handle_usr2(self) -> None:
        if self.upgrade or self.reload:
            log.warning("USR2: an upgrade or reload is under way: ignored")
            return
        self.start_upgrade()

    def close_listeners(self, listeners: dict[str, socket.socket],
                        keep: dict[str, socket.socket] | None = None) -> None:
        """Close the sockets in `listeners` that `keep` does not hold too."""
        kept = set(map(id, (keep or {}).values()))
        for address, sock in listeners.items():
            if id(sock) not in kept and sock.fileno() != -1:
                log.info("no longer listening on %s", address)
                sock.close()

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
