"""What the master tells the world: the scoreboard header, systemd (READY, STATUS), whoever
waits for it to serve (--daemon's launcher, a USR2 predecessor), and the metrics port.

A mixin of the Arbiter (arbiter.py).
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

from .config import Config
from .daemonize import report_failure
from .logs import log
from .sockets import BindError
from .supervision import KILL_GRACE

if TYPE_CHECKING:
    from .arbiter import Arbiter
    from .metrics import MetricsServer

STATUS_EVERY = 5.0  # seconds between STATUS= refreshes for systemctl status


class Reporting:
    """The Arbiter's voice."""

    def open_metrics(self: Arbiter, cfg: Config) -> MetricsServer:
        from .metrics import MetricsServer, ScoreboardCollector  # only when asked for: 4 MB less

        collector = ScoreboardCollector(self.board, self.board.read_header, self.pid, self.metrics_figures)
        server = MetricsServer(cfg.metrics_bind, 64, collector)
        server.probe = self.probe  # /ready and /live (balancer.py)
        return server

    def metrics_figures(self: Arbiter) -> dict[str, float]:
        """The master's own figures for the metrics (the scoreboard has the rest)."""
        return {"max_connections": self.cfg.max_connections,
                "upgrade_failed": int(self.last_upgrade.startswith("upgrade FAILED"))}

    def announce_ready(self: Arbiter) -> None:
        """Our first workers serve: tell whoever waits for it (USR2's old master)."""
        self.announced_ready = True
        log.info("ready: %d workers serving", self.target)
        self.notifier.ready(self.status_line())
        if self.predecessor:
            self.predecessor.say("ready")  # and wait for its "go"
            self.ready_fd = None
        elif self.ready_fd is not None:
            try:
                os.write(self.ready_fd, b"ready\n")
            except OSError as e:
                log.warning("cannot tell the old master we are ready: %s", e.strerror)
            os.close(self.ready_fd)
            self.ready_fd = None

    def give_up(self: Arbiter, why: str) -> None:
        """Before we ever served: tell whoever waits for us why, and stop."""
        log.error("giving up: %s", why)
        report_failure(why, self.ready_fd)
        self.ready_fd = None
        self.begin_stop("fast", signal.SIGQUIT, KILL_GRACE)

    def publish(self: Arbiter, message: str | None = None) -> None:
        """The header for `lancelotd status`; now and then a STATUS= line for systemd."""
        self.header.generation = self.generation
        self.header.workers_target = self.target
        self.header.reload_pending = int(bool(self.reload or self.reload_queued))
        self.header.metrics_port = self.metrics.port if self.metrics else 0
        self.header.agent_port = self.balance.agent.port if self.balance.agent else 0
        self.header.balance = self.balance.state
        self.header.drained = int(self.balance.drained)
        self.board.publish(self.header, message)  # one record: `lancelotd reload` reads it whole
        now = time.monotonic()
        if self.notifier.enabled and now >= self.next_status:
            self.next_status = now + STATUS_EVERY
            self.notifier.status(self.status_line())

    def status_line(self: Arbiter) -> str:
        answered = self.board.totals().answered
        last = "none"
        if self.header.reloads:
            when = time.strftime("%H:%M:%S", time.localtime(self.header.last_reload))
            last = f"{'ok' if self.header.last_reload_ok else 'FAILED'} at {when}"
            if not self.header.last_reload_ok:
                last += f" ({self.board.read_message()})"
        line = (f"gen {self.generation}, {len(self.pool.serving(self.generation))} workers, "
                f"{answered} questions answered, last reload: {last}")
        notes = [note for note in (self.last_upgrade, self.balance_note()) if note]
        return "; ".join([line, *notes])

    def move_metrics(self: Arbiter, cfg: Config) -> None:
        if self.metrics:
            self.metrics.close()
            self.metrics = None
        if cfg.metrics_bind:
            try:
                self.metrics = self.open_metrics(cfg)
            except BindError as e:
                log.error("metrics: %s; metrics are off until the next reload", e)
