"""A worker: one process, one epoll loop, many connections (docs/PROMISES.md §1).

The loop is written for the hot path: a request is one recv(), one dict
lookup and one send().  Everything that is not per-request (idle timeouts,
the master-alive check) runs on a one-second tick.

Signals from the master: TERM = stop (answer what was received, close),
INT/QUIT = exit now, USR2 = retire (stop accepting, hand the connections
held to current workers - see handoff.py - and serve those it cannot hand
over until they close or graceful_timeout passes), USR1 = reopen the log.
SIGALRM is the worker's one timer (the end of an accept pause or a yield, of
the wait for questions on their way at stop), so the loop needs no timer
check.  SIGURG is another worker's nudge: accept now (spread.py).

Rooms: this module is the loop, signals and the tick; accepting.py the
listeners; connections.py writing and closing a connection; retirement.py
how a worker leaves (hand-off, last accept sweep, stop); spread.py sharing
new connections with the other workers.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from setproctitle import setproctitle

from . import connlog, handoff, logs
from .accepting import Accepting
from .access import make_gate
from .clients import ClientTable
from .config import Config
from .connections import EPOLLIN, RECV_SIZE, Conn, Connections
from .draining import Draining
from .limits import AcceptPause
from .logs import log, set_role
from .protocol import AnswerTable
from .proxied import ProxyHeaders
from .retirement import Retirement
from .scoreboard import DRAINING, RECENT_CLIENTS, SERVING, STARTING, STOPPING, Counters, Scoreboard, Slot
from .scoreboard import path_for as scoreboard_path
from .sockets import acceptor
from .spread import NUDGE, AcceptLoads, Spreading
from .strays import ignore_in_worker

TICK = 1.0  # at most; see Worker.tick

# The master forks us with its signals blocked; they stay blocked until our
# handlers are in place, or one sent during boot would kill us (default action).
OWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM,
               NUDGE)
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)  # the master's business: ignored
BOOT_BLOCKED = frozenset({*OWN_SIGNALS, *MASTER_SIGNALS, signal.SIGCHLD})
# Let a process waiting for this CPU (another worker, most often) run, at the end of a turn, at
# most this often (seconds).  Without it a busy worker keeps the CPU until the scheduler's tick
# (4 ms at HZ=250), and a question to a worker not running waits that long: the connect-per-request
# p99 was 5 ms.  Every turn cost persistent clients 1-4 % in context switches; every 0.5 ms let
# the tail back; every 1 ms on established connections doubled their p99 and won nothing
# measurable (docs/PERFORMANCE.md, "Sharing a CPU").  Alone on its CPU: one cheap system call.
YIELD_EVERY = 0.0002


@dataclass
class WorkerSpec:
    """Everything the master hands a worker it forks."""

    number: int
    generation: int
    listeners: list[socket.socket]
    cfg: Config
    master_pid: int
    board: Scoreboard
    slot: int
    events_fd: int  # write end of the master's event pipe: "my state changed"
    max_requests: int  # 0 = never recycle
    clients: ClientTable | None = None  # the per-client counts, when max_connections_per_client is set
    proxied: dict[int, tuple[str, ...]] = field(default_factory=dict)  # PROXY listeners' fd -> trusted
    loads: AcceptLoads | None = None  # every worker's live connections, to spread accepts (spread.py)
    held: bool = False  # a USR2 successor's, not let in yet: no accept until the master says (upgrade.py)


class Worker(Accepting, Connections, Retirement, Draining, ProxyHeaders, Spreading):
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.number = spec.number
        self.generation = spec.generation
        self.listeners = {s.fileno(): s for s in spec.listeners}
        self.acceptors = {fd: acceptor(s) for fd, s in self.listeners.items()}  # the hot path's accept()
        self.cfg = cfg = spec.cfg
        self.master_pid = spec.master_pid
        self.table = AnswerTable(cfg.answers, cfg.unknown_answer, cfg.max_question_bytes)
        self.conns: dict[int, Conn] = {}
        self.access: connlog.AccessLog | None = None  # the access log, when on (connlog.install)
        self.epoll = select.epoll()
        self.accepting = False
        self.held = spec.held  # accepting.py: until our master's header says accepts_held = 0
        self.state = STARTING
        self.deadline = 0.0  # when a drain or stop gives up
        self.stop_wait_ends = 0.0  # at TERM: the end of the wait for questions on their way (retirement.py)
        self.stuck_logged = 0.0  # retirement._hand_off: when "N connections wait for a target" was logged
        self.pending_signals: list[int] = []
        self.counters = Counters()
        self.answered = 0  # hot-path counters, folded into self.counters per tick
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = time.time()
        self.published_at = time.monotonic()
        self.rate = 0.0  # questions answered per second over the last tick
        board_path = scoreboard_path(cfg.pid_file) if cfg.pid_file else ""
        self.handoff = handoff.HandOff(self, cfg.pid_file, board_path, spec.board, cfg.max_connections)
        self.rotation = 0  # where the next turn starts serving writable connections (_serve_writable)
        # The heartbeat goes with the tick: several per worker_timeout, so a
        # busy but healthy worker is never mistaken for a hung one.
        self.tick = min(TICK, cfg.worker_timeout / 4)
        # accept statistics, logged at exit: wake-ups per accepted connection
        self.accept_wakeups = 0
        self.empty_wakeups = 0
        self.clients_gone = 0  # accept() failures that concern one client only (ECONNABORTED...)
        self.accept_paused = False  # out of descriptors: not watching the listeners until the alarm
        self.accept_pause = AcceptPause()
        # allow/deny and the per-client limit (access.py); None when there is nothing to check
        self.gate = make_gate(cfg.allow, cfg.deny, cfg.max_connections_per_client, spec.clients, spec.slot,
                              cfg.max_connections_per_client_ipv6_prefix)
        self._init_proxy_headers(spec.proxied)  # PROXY protocol listeners (proxied.py)
        self.recent: deque[tuple | None] = deque(maxlen=RECENT_CLIENTS)  # latest clients, for `status`
        self._init_spreading(spec.loads)  # new connections spread over the workers (spread.py)

    # --- set-up --------------------------------------------------------

    def _install_signals(self) -> None:
        """Handlers only record; the loop sees the signal through the wakeup pipe."""
        self.sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
        for sig in OWN_SIGNALS:
            signal.signal(sig, self._record_signal)
        for sig in MASTER_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ignore_in_worker()  # stray signals (strays.py): SIG_IGN, and unblocked (the master blocks them)
        self.epoll.register(self.sig_r, EPOLLIN)
        # Only now: what came during boot reaches our handlers, and the loop.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, BOOT_BLOCKED)

    def _record_signal(self, signum: int, frame: object) -> None:
        self.pending_signals.append(signum)

    # --- the loop ------------------------------------------------------

    def run(self) -> int:
        set_role(f"worker {self.number}")
        setproctitle(f"lancelotd: worker {self.number} [gen {self.generation}]")
        self._install_signals()
        self.handoff.start()
        self._start_accepting()
        self._set_state(SERVING, time.monotonic())
        log.debug("serving (gen %d)", self.generation)
        return self._loop()

    def _set_state(self, state: int, now: float) -> None:
        self.state = state
        self._publish(now)
        try:  # wake the master: it waits for new workers to serve
            os.write(self.spec.events_fd, b"s")
        except OSError:
            pass

    def _publish(self, now: float) -> None:
        """Write this worker's slot: heartbeat and counters (once per tick)."""
        c = self.counters
        elapsed = now - self.published_at
        if elapsed >= self.tick / 2:  # a state change between ticks keeps the last rate
            self.rate = self.answered / elapsed
        self.published_at = now
        c.answered += self.answered
        c.bytes_in += self.bytes_in
        c.bytes_out += self.bytes_out
        self.answered = self.bytes_in = self.bytes_out = 0
        c.unknown = self.table.unknown_count
        self.spec.board.write_slot(self.spec.slot, Slot(
            os.getpid(), self.number, self.generation, self.state, self.started, now,
            len(self.conns), self.rate, c, tuple(a for a in reversed(self.recent) if a is not None),
        ))

    def _loop(self) -> int:
        # Everything the per-request path touches is a local: this loop is
        # where a worker spends its life, and locals are Python's fast path.
        conns = self.conns
        listeners = self.listeners
        poll = self.epoll.poll
        exact = self.table.exact.get
        tick = self.tick
        counting = self.access is not None  # per-connection counts for the access log (connlog.py)
        sched_yield = os.sched_yield
        yielded_at = 0.0
        next_tick = time.monotonic() + tick
        while True:
            events = poll(tick)
            now = time.monotonic()
            answered = bytes_in = bytes_out = 0
            writable = []
            for fd, _ev in events:
                conn = conns.get(fd)
                if conn is None:
                    if fd in listeners:
                        self._accept(listeners[fd], now)
                    elif fd == self.sig_r:
                        code = self._handle_signals(now)
                        if code is not None:
                            return code
                    elif fd in self.awaiting:  # a PROXY header on its way (proxied.py)
                        self._header_event(fd, now)
                    else:
                        self._take_over(fd, now)
                    continue
                if conn.writing:  # output owed or input held back: after the others, see below
                    writable.append(conn)
                    continue
                # The hot path: one recv, one lookup, one send.
                sock = conn.sock
                try:
                    data = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    self._broken(conn)
                    continue
                if not data:  # half-close: all it sent is answered (and sent) already
                    self._forget(conn)
                    continue
                # One whole known question on an open connection (OPEN is state 0), nothing left
                # from before, no access log counting: as most reads are.  Any other read goes the
                # general way (connections.py).
                out = None if conn.pending or conn.state or counting else exact(data)
                if out is None:
                    self._answer_read(conn, data, now)
                    continue
                answered += 1
                bytes_in += len(data)
                bytes_out += len(out)
                conn.last = now
                try:
                    sent = sock.send(out)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._broken(conn)
                    continue
                if sent != len(out):
                    # Back-pressure: stop reading from this client until it reads.
                    conn.out = out[sent:]
                    self._want_output(conn)
            self.answered += answered
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out
            if writable:  # after every question that came in: see _serve_writable
                self._serve_writable(writable, now)
            if now - yielded_at >= YIELD_EVERY:  # see YIELD_EVERY
                sched_yield()
                yielded_at = now
            if self.state != SERVING and not conns and self._done(now):
                return self._exit_code()  # retired or stopping, the last client gone or handed over
            if now >= next_tick:
                next_tick = now + tick
                code = self._tick(now)
                if code is not None:
                    return code

    def _alarm(self, now: float) -> None:
        if self.state == STOPPING:
            if now >= self.stop_wait_ends - 0.05:  # not an alarm set before the stop, queued behind TERM
                self._close_open()  # the wait for questions on their way is over
            return
        if self.yielding is not None:
            self._end_yield()
        if self.accept_paused:
            self._resume_accepting()

    # --- timers and signals --------------------------------------------

    def _tick(self, now: float) -> int | None:
        if os.getppid() != self.master_pid and self.state == SERVING:
            # Retire the normal way: our clients go to whoever the public scoreboard names (after a
            # USR2 successor died, the old master's workers again), the inbox is removed at exit.
            log.warning("master %d is gone: retiring", self.master_pid)
            self.held = False
            self._drain(now)
        self._expire(now)
        self._expire_headers(now)  # PROXY headers not complete in time (proxied.py)
        self._shed(now)  # a drained host, max_connection_age (draining.py)
        self.accept_pause.check_over(now)
        if self.held:
            self._let_in()  # a nudge lost (or sent before our handlers): the header says it too
        self.handoff.tick(now)
        if self.state == DRAINING:
            self._hand_off()  # again, for those a target could not take before
        max_requests = self.spec.max_requests
        if max_requests and self.state == SERVING and self.counters.answered + self.answered >= max_requests:
            log.info("served %d questions (max_requests): retiring", max_requests)
            self._drain(now)
        self._publish(now)
        self._spread_tick()
        if self.access is not None:
            self.access.flush()  # the lines of this tick's closes too (idle, drain, hand-off)
        if self.state != SERVING:
            if self._done(now):
                return self._exit_code()
            if now >= self.deadline:
                if self.state == DRAINING:
                    self._stop(now)  # drain time is up: close what is left
                else:
                    log.warning("%d connections still open at graceful_timeout: closing them",
                                len(self.conns))
                    return self._exit_code()
        return None

    def _handle_signals(self, now: float) -> int | None:
        try:
            while os.read(self.sig_r, 512):
                pass
        except BlockingIOError:
            pass
        signals, self.pending_signals = self.pending_signals, []
        for signum in signals:
            if signum == signal.SIGTERM:
                self._stop(now)
            elif signum == signal.SIGUSR2:
                self._drain(now)
            elif signum == signal.SIGUSR1:
                if logs.reopen(self.cfg.log_file, self.cfg.log_level):  # else: on with the old file
                    log.info("log file reopened")
            elif signum == signal.SIGALRM:
                self._alarm(now)
            elif signum == NUDGE:
                if self.held:
                    self._let_in()  # the master's word, unless it is a stray nudge
                self._nudged(now)
            else:  # INT, QUIT: fast stop
                return self._exit_code()
        if self.state != SERVING and self._done(now):
            return self._exit_code()
        return None

    def _exit_code(self) -> int:
        self.handoff.stop_receiving()
        self._publish(time.monotonic())  # the master folds our last counters into its totals
        if self.access is not None:
            for conn in self.conns.values():  # still open as the worker goes: they end with it
                self.access.closed(conn, "stop")
            self.access.flush()
        log.info(
            "exiting: %d connections accepted in %d listener wake-ups (%d empty), %d questions answered, "
            "%d connections handed over, %d gone before accept, %d yields to other workers",
            self.counters.accepted, self.accept_wakeups, self.empty_wakeups, self.counters.answered,
            self.handoff.adopted, self.clients_gone, self.yields,
        )
        return 0


def run_worker(spec: WorkerSpec) -> int:
    """Serve until told to stop; the exit code for os._exit()."""
    # Already blocked if the master forked us so; this makes sure (it costs nothing).
    signal.pthread_sigmask(signal.SIG_BLOCK, BOOT_BLOCKED)
    # Fault injection for the tests: a long boot (signals sent during it; a worker
    # failing late), then a failure (boot back-off, failed reloads and upgrades).
    # LANCELOTD_TEST_BOOT_DELAY=SECONDS[@GEN:NUMBER], LANCELOTD_TEST_FAIL_BOOT=GEN[:NUMBER].
    who_am_i = f"{spec.generation}:{spec.number}"
    # Each may be made conditional on a file's presence (..._IF=PATH): a test then touches it
    # once the first master serves, and only a USR2 successor's workers are affected.
    delay, _, who = os.environ.get("LANCELOTD_TEST_BOOT_DELAY", "").partition("@")
    delay_if = os.environ.get("LANCELOTD_TEST_BOOT_DELAY_IF", "")
    if delay and who in ("", who_am_i) and (not delay_if or os.path.exists(delay_if)):
        time.sleep(float(delay))
    fail_if = os.environ.get("LANCELOTD_TEST_FAIL_BOOT_IF", "")
    fail_who = os.environ.get("LANCELOTD_TEST_FAIL_BOOT")
    failing = fail_who in (str(spec.generation), who_am_i)
    if fail_if and fail_who:  # both: that worker, once the file exists
        failing = failing and os.path.exists(fail_if)
    elif fail_if:
        failing = os.path.exists(fail_if)
    if failing:
        log.error("failing at boot (LANCELOTD_TEST_FAIL_BOOT*)")
        return 3
    worker = Worker(spec)
    connlog.install(worker)  # the access log, when [log] access is set; the generation for JSON lines
    return worker.run()
