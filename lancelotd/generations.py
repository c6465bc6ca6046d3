"""Generations: how a reload (HUP) commits or aborts, as a part of the master.

A reload starts a whole new generation of workers with the new config; only
once every one of them serves is the old generation retired (commit), so
there is always a generation accepting.  If a new worker cannot boot, or the
generation is not serving within RELOAD_TIMEOUT, the new generation is
retired (its clients handed to the current one) and everything is as it was
before the HUP (abort): same config, same sockets, same log file, same workers.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import logs
from .config import Config, ConfigError
from .logs import log
from .sockets import BindError, open_listeners

if TYPE_CHECKING:
    from .arbiter import Arbiter

RELOAD_TIMEOUT = 30.0  # a new generation not serving by then is abandoned


FIXED_AT_START = ("pid_file", "drain_file", "user", "group")  # a reload that changes them is refused


@dataclass
class Reload:
    cfg: Config
    generation: int
    listeners: dict[str, socket.socket]
    started: float = field(default_factory=time.monotonic)


class Generations:
    """The reload half of the Arbiter (a mixin: it works on the master's own state)."""

    def begin_reload(self: Arbiter) -> None:
        """Validate the new config and start its generation; refuse with the reason otherwise."""
        log.info("reloading %s", self.config_name())
        self.notifier.reloading()
        try:
            cfg = self.load_config()
        except ConfigError as e:
            self.reload_done(False, "config refused: " + "; ".join(e.problems))
            for problem in e.problems:
                log.error("reload refused: %s: %s", e.path, problem)
            return
        fixed = [name for name in FIXED_AT_START if getattr(cfg, name) != getattr(self.cfg, name)]
        # The files are every other process's way to us, and were made for the workers' user: a
        # half-applied move or change would lose them.
        if fixed:
            why = f"{' and '.join(fixed)} changed: restart to apply"
            self.reload_done(False, why)
            log.error("reload refused: %s", why)
            return
        try:
            listeners = open_listeners(cfg, self.listeners)
        except BindError as e:
            self.reload_done(False, str(e))
            log.error("reload refused: %s", e)
            return
        if not logs.reopen(cfg.log_file, cfg.log_level, cfg.log_format):  # the new workers inherit it
            self.close_listeners(listeners, keep=self.listeners)
            self.reload_done(False, f"cannot open log file {cfg.log_file}")
            log.error("reload refused: cannot open log file %s", cfg.log_file)
            return
        self.warn_about_limits(cfg)
        self.reload = Reload(cfg, self.generation + 1, listeners)
        self.spawn_missing()

    def check_reload(self: Arbiter) -> None:
        reload = self.reload
        if reload is None:
            return
        if self.generation_serving(reload.generation, reload.cfg.workers):
            self.commit_reload(reload)
        elif time.monotonic() - reload.started > RELOAD_TIMEOUT:
            self.abort_reload(f"the new workers were not serving after {RELOAD_TIMEOUT:.0f}s")

    def commit_reload(self: Arbiter, reload: Reload) -> None:
        old_generation = self.generation
        self.close_listeners(self.listeners, keep=reload.listeners)
        if reload.cfg.metrics_bind != self.cfg.metrics_bind:
            self.move_metrics(reload.cfg)
        self.move_agent(reload.cfg)  # only if agent_bind changed
        self.cfg, self.generation, self.listeners = reload.cfg, reload.generation, reload.listeners
        logs.set_generation(self.generation)
        self.target = reload.cfg.workers
        self.reload = None
        self.publish()  # retiring workers read the current generation here: their hand-off targets
        for worker in list(self.pool.workers.values()):
            if worker.generation != self.generation:
                self.retire(worker)
        self.reload_done(True, f"generation {self.generation} serving")
        log.info("reload done: generation %d serving with %d workers, generation %d retiring",
                 self.generation, self.target, old_generation)
        self.set_title()
        self.run_queued_reload()

    def abort_reload(self: Arbiter, why: str) -> None:
        """Retire the new generation and go back to exactly what ran before the HUP.

        Retired, not stopped: the clients its workers accepted meanwhile are
        handed to the current generation (the scoreboard header still names it).
        """
        reload = self.reload
        if reload is None:
            return
        self.reload = None
        for worker in list(self.pool.workers.values()):
            if worker.generation == reload.generation:
                self.retire(worker)
        self.close_listeners(reload.listeners, keep=self.listeners)
        self.pool.forget_backoff([self.generation])
        # If it fails, the one open logs on.
        logs.reopen(self.cfg.log_file, self.cfg.log_level, self.cfg.log_format)
        self.reload_done(False, why)
        log.error("reload failed: %s; generation %d keeps serving", why, self.generation)
        self.run_queued_reload()

    def run_queued_reload(self: Arbiter) -> None:
        if self.reload_queued and not self.stopping and not self.upgrade:
            self.reload_queued = False
            self.begin_reload()

    def reload_done(self: Arbiter, ok: bool, why: str) -> None:
        self.header.reloads += 1
        self.header.reload_failures += 0 if ok else 1
        self.header.last_reload = time.time()
        self.header.last_reload_ok = int(ok)
        self.publish(message=why)
        self.notifier.ready(self.status_line())  # done, or refused: systemd waits for this
