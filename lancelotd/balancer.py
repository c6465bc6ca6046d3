"""The master behind a load balancer: its balance state, the agent port, /ready and /live,
and drain_delay at TERM.  A mixin of the Arbiter (arbiter.py); agent.py has the pieces.

The balance state is what the agent port and /ready say, decided in this order:

    STOPPING     TERM received (drain_delay running, or the stop itself)    agent: drain   /ready: 503
    DRAINED      the drain file exists (`lancelotd drain`)                   agent: drain   /ready: 503
    NOT_SERVING  no worker of the current generation serves (yet)           agent: drain   /ready: 503
    READY        otherwise                                                  agent: ready   /ready: 200

It is published in the scoreboard header, where `status`, the metrics and the workers read
it: a worker of a DRAINED or STOPPING host closes its connections at idle points
(draining.py).  A USR2 successor not yet let in counts as serving: its predecessor's workers
serve the very sockets it holds.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .agent import (
    AGENT_DRAIN,
    AGENT_READY,
    BALANCE_NAMES,
    DRAINED,
    NOT_SERVING,
    READY,
    STOPPING,
    AgentServer,
    drain_file,
    is_drained,
)
from .config import Config
from .logs import log
from .scoreboard import SERVING
from .sockets import BindError
from .supervision import KILL_GRACE

if TYPE_CHECKING:
    from .arbiter import Arbiter

STOP_MARGIN = 2 * 2.0 + KILL_GRACE  # what systemd should allow past graceful_timeout (EXTEND_TIMEOUT_USEC)


@dataclass
class Balance:
    """The master's part of being behind a balancer."""

    agent: AgentServer | None = None
    path: str = ""  # the drain file
    drained: bool = False
    unreadable: bool = False  # the drain file could not be checked: logged once, last answer kept
    state: int = NOT_SERVING
    draining_since: float = field(default_factory=time.monotonic)  # when the answer became "drain"
    stop_at: float = 0.0  # monotonic end of drain_delay; 0 = no TERM waiting


class Balancing:
    """The Arbiter's face to load balancers."""

    # --- set-up and the agent port ------------------------------------------------

    def open_balance(self: Arbiter) -> None:
        """At start: where the drain file is, whether it is there, and the agent port (BindError)."""
        self.balance.path = drain_file(self.cfg)
        self.check_drain_file()
        if self.balance.drained:
            log.info("starting drained (%s exists): the agent says drain until `lancelotd undrain`",
                     self.balance.path)
        if self.cfg.agent_bind:
            self.balance.agent = AgentServer(self.cfg.agent_bind, self.agent_answer)

    def move_agent(self: Arbiter, cfg: Config) -> None:
        """Rebind the agent port for `cfg` (a reload; "" releases it for a USR2 successor)."""
        agent = self.balance.agent
        if agent and agent.address == cfg.agent_bind:
            return
        if agent:
            agent.close()
            self.balance.agent = None
        if cfg.agent_bind:
            try:
                self.balance.agent = AgentServer(cfg.agent_bind, self.agent_answer)
            except BindError as e:
                log.error("agent: %s; the agent port is off until the next reload", e)

    def balance_fds(self: Arbiter) -> list[int]:
        return self.balance.agent.fds() if self.balance.agent else []

    def serve_balance(self: Arbiter, readable: list[int]) -> None:
        if self.balance.agent:
            self.balance.agent.handle(readable)

    def close_balance(self: Arbiter) -> None:
        """At exit, and in a forked worker: the agent port is the master's alone."""
        if self.balance.agent:
            self.balance.agent.close()
            self.balance.agent = None

    # --- the state -----------------------------------------------------------------

    def agent_answer(self: Arbiter) -> bytes:
        return AGENT_READY if self.balance_state() == READY else AGENT_DRAIN

    def balance_state(self: Arbiter) -> int:
        if self.stopping or self.balance.stop_at:
            return STOPPING
        if self.balance.drained:
            return DRAINED
        return READY if self.serving_now() else NOT_SERVING

    def serving_now(self: Arbiter) -> bool:
        if self.predecessor:  # not let in yet: the old master's workers serve our sockets
            return True
        return self.announced_ready and any(
            self.pool.state(worker) == SERVING for worker in self.pool.serving(self.generation))

    def probe(self: Arbiter, path: bytes) -> tuple[str, bytes] | None:
        """/ready and /live for the metrics listener: (HTTP status, body), None for other paths."""
        if path == b"/live":  # answered from the master's loop: if it answers, the loop turns
            return "200 OK", b"alive\n"
        if path == b"/ready":
            state = self.balance_state()
            return ("200 OK" if state == READY else "503 Service Unavailable",
                    BALANCE_NAMES[state].encode() + b"\n")
        return None

    def check_drain_file(self: Arbiter) -> None:
        """One stat(): the operator's drain is seen within one loop turn (at most 0.5 s)."""
        balance = self.balance
        try:
            balance.drained = is_drained(balance.path)
        except OSError as e:
            if not balance.unreadable:
                log.error("cannot check the drain file %s: %s; keeping the last state (%s)",
                          balance.path, e.strerror, "drained" if balance.drained else "not drained")
            balance.unreadable = True
            return
        balance.unreadable = False

    def check_balance(self: Arbiter) -> None:
        """Every loop turn: the drain file, the state's changes, the end of drain_delay."""
        balance = self.balance
        was_drained = balance.drained
        self.check_drain_file()
        if balance.drained != was_drained:
            log.info("%s by the operator (%s)", "drained" if balance.drained else "undrained", balance.path)
        state = self.balance_state()
        if state != balance.state:
            if balance.state == READY:
                balance.draining_since = time.monotonic()
            log.info("balance: %s (the agent says %s)", BALANCE_NAMES[state],
                     self.agent_answer().decode().strip())
            balance.state = state
            if self.stopping:  # the header only: STATUS= says "stopping" until the end
                self.header.balance = state
                self.board.publish(self.header)
            else:
                self.next_status = 0.0  # systemd's STATUS= at once
                self.publish()
        if balance.stop_at and not self.stopping and time.monotonic() >= balance.stop_at:
            log.info("drain_delay over: stopping")
            self.begin_stop("graceful", signal.SIGTERM, self.cfg.graceful_timeout + KILL_GRACE)

    def balance_note(self: Arbiter) -> str:
        """For systemd's STATUS= line: "" when ready."""
        balance = self.balance
        if balance.stop_at and not self.stopping:
            left = max(0.0, balance.stop_at - time.monotonic())
            return f"stopping in {left:.0f}s (drain_delay): the agent says drain"
        if balance.state == DRAINED:
            return "drained: the agent says drain"
        return ""

    # --- TERM with drain_delay -----------------------------------------------------

    def delay_stop(self: Arbiter) -> bool:
        """TERM: True when the stop waits for drain_delay (the agent says drain meanwhile).

        The delay counts from when the agent began to say drain: a host drained by the
        operator long enough ago stops at once.  A second TERM stops now; INT/QUIT stop
        now, fast.  Only a master that serves the service waits (not a USR2 successor
        stopped by its predecessor, nor one that never served).
        """
        balance = self.balance
        now = time.monotonic()
        if balance.stop_at:
            log.info("TERM again: stopping now, %.1fs before drain_delay is over", balance.stop_at - now)
            return False
        if self.stopping or self.predecessor or not self.announced_ready or not self.cfg.drain_delay:
            return False
        shown = now - balance.draining_since if balance.state != READY else 0.0
        delay = self.cfg.drain_delay - shown
        if delay <= 0:
            log.info("TERM: the agent has said drain for %.1fs already (drain_delay %gs): stopping now",
                     shown, self.cfg.drain_delay)
            return False
        balance.stop_at = now + delay
        self.reload_queued = False
        if self.upgrade:
            self.abandon_upgrade("stopping")
        log.info("TERM: the agent and /ready say drain; accepting and serving %.1fs more "
                 "(drain_delay), then stopping", delay)
        # Systemd counts TimeoutStopSec from STOPPING=1: ask for the time this stop may take.
        extend = int((delay + self.stop_grace()) * 1e6)
        self.notifier.notify("STOPPING=1", f"EXTEND_TIMEOUT_USEC={extend}",
                             f"STATUS=stopping in {delay:.0f}s (drain_delay): the agent says drain")
        self.set_title(" (stopping: drain_delay)")
        self.check_balance()
        return True

    def stop_grace(self: Arbiter) -> float:
        return self.cfg.graceful_timeout + STOP_MARGIN
