"""Prometheus metrics, served by the master from its own loop (`metrics_bind`).

prometheus_client writes the exposition format; a custom collector reads
the scoreboard at scrape time, so the workers' hot path pays nothing.  Its
HTTP server runs in a thread, and a thread in a process that forks workers
is a hazard (a lock held at fork time stays held in the child), so the
master serves the few bytes of HTTP itself: non-blocking, from the same
select() loop as the signals, never from a worker.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Collection, Iterator

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .agent import BALANCE_NAMES
from .logs import log
from .scoreboard import STATE_NAMES, Header, Scoreboard
from .sockets import bind, format_address

REQUEST_TIMEOUT = 5.0  # a whole exchange: the request in, the response out
REQUEST_PHASE = 1.0  # the request alone: a probe's or a scraper's arrives in one segment
MAX_REQUEST = 8192
MAX_SCRAPERS = 8  # exchanges at once; at the bound a new connection evicts the oldest
ACCEPTS_PER_TURN = 64  # per loop turn: a flood is taken (and evicted) in bounded steps


ERROR_KINDS = ("unknown", "too_long", "not_ascii", "timeouts")


def relative_generation(generation: int, current: int) -> str:
    """A worker's generation as a label of bounded values: every reload would add series otherwise."""
    if generation == current:
        return "current"
    return "next" if generation > current else "old"


class ScoreboardCollector:
    """Turns one scoreboard read into metric families at each scrape.

    Worker series are labelled by worker number and by their generation relative to the
    current one ("current", "next" while a reload starts one, "old" while one retires), never by
    PID or absolute generation, so reloads and recycling reuse the same series (Prometheus'
    advice: no unbounded label values).  Two processes with the same labels (a recycled worker
    draining beside its replacement) are summed.
    """

    def __init__(self, board: Scoreboard, header: Callable[[], Header], master_pid: int,
                 master: Callable[[], dict[str, float]] | None = None) -> None:
        self.board = board
        self.header = header
        self.master_pid = master_pid
        self.master = master or dict  # the master's own figures: max_connections, upgrade_failed

    def collect(self) -> Iterator[Metric]:
        header = self.header()
        slots = [slot for _, slot in self.board.slots()]
        totals = self.board.totals(slots)  # the same reading: a worker's tick between two would skew them
        labels = ["worker", "generation"]
        per_worker: dict[tuple[str, str], list[float]] = {}
        for slot in slots:
            c = slot.counters
            assert c is not None
            key = (str(slot.number), relative_generation(slot.generation, header.generation))
            sums = per_worker.setdefault(key, [0.0] * (2 + len(ERROR_KINDS)))
            for i, value in enumerate((c.answered, slot.connections, *(getattr(c, k) for k in ERROR_KINDS))):
                sums[i] += value
        answered = CounterMetricFamily("lancelotd_worker_questions_answered", "Questions answered",
                                       labels=labels)
        conns = GaugeMetricFamily("lancelotd_worker_connections", "Open connections", labels=labels)
        errors = CounterMetricFamily("lancelotd_worker_errors", "Protocol errors and idle timeouts",
                                     labels=[*labels, "kind"])
        for key, sums in sorted(per_worker.items()):
            answered.add_metric(list(key), sums[0])
            conns.add_metric(list(key), sums[1])
            for kind, value in zip(ERROR_KINDS, sums[2:], strict=True):
                errors.add_metric([*key, kind], value)
        yield from (answered, conns, errors)
        yield from self.limits(header, slots)

        yield CounterMetricFamily("lancelotd_questions_answered", "Questions answered by all workers, "
                                  "exited ones included", value=totals.answered)
        yield CounterMetricFamily("lancelotd_connections_accepted", "Connections accepted",
                                  value=totals.accepted)
        yield GaugeMetricFamily("lancelotd_connections", "Open connections",
                                value=sum(slot.connections for slot in slots))
        total_errors = CounterMetricFamily("lancelotd_errors", "Errors by kind", labels=["kind"])
        for kind in ERROR_KINDS:
            total_errors.add_metric([kind], getattr(totals, kind))
        yield total_errors
        refused = CounterMetricFamily("lancelotd_connections_refused", "Connections refused by the access "
                                      "rules, by cause (denied_open: open ones a reload's rules deny)",
                                      labels=["cause"])
        for cause in ("denied", "per_client_limit", "denied_open"):
            refused.add_metric([cause], getattr(totals, cause))
        yield refused
        proxy = CounterMetricFamily("lancelotd_proxy_protocol_connections", "PROXY protocol listeners: "
                                    "health checks (local), connections closed by cause", labels=["outcome"])
        for outcome in ("local", "invalid", "untrusted", "timeout"):
            proxy.add_metric([outcome], getattr(totals, f"proxy_{outcome}"))
        yield proxy
        yield CounterMetricFamily("lancelotd_received_bytes", "Bytes received", value=totals.bytes_in)
        yield CounterMetricFamily("lancelotd_sent_bytes", "Bytes sent", value=totals.bytes_out)

        reloads = CounterMetricFamily("lancelotd_reloads", "Reloads by result", labels=["result"])
        reloads.add_metric(["ok"], header.reloads - header.reload_failures)
        reloads.add_metric(["failed"], header.reload_failures)
        yield reloads
        restarts = CounterMetricFamily("lancelotd_worker_restarts", "Workers replaced, by reason",
                                       labels=["reason"])
        for reason, value in (("crashed", header.replaced_crashed), ("hung", header.replaced_hung),
                              ("recycled", header.recycled)):
            restarts.add_metric([reason], value)
        yield restarts
        yield GaugeMetricFamily("lancelotd_generation", "Generation of workers serving",
                                value=header.generation)
        yield GaugeMetricFamily("lancelotd_drained", "1 while drained by the operator (lancelotd drain)",
                                value=header.drained)
        balance = GaugeMetricFamily("lancelotd_balance_state", "What the agent port and /ready say: "
                                    "1 for the current state", labels=["state"])
        for state, name in BALANCE_NAMES.items():
            balance.add_metric([name], int(header.balance == state))
        yield balance
        states = GaugeMetricFamily("lancelotd_workers", "Workers by state", labels=["state"])
        for state, name in STATE_NAMES.items():
            if name != "free":
                states.add_metric([name], sum(1 for slot in slots if slot.state == state))
        yield states

        yield from self.processes(header, slots)

    def limits(self, header: Header, slots: list) -> Iterator[Metric]:
        """What the alert rules compare against (etc/prometheus/lancelotd.rules.yml)."""
        master = self.master()
        yield GaugeMetricFamily("lancelotd_max_connections", "max_connections: connections one worker "
                                "holds at most", value=master.get("max_connections", 0))
        yield GaugeMetricFamily("lancelotd_workers_target", "Workers wanted in the current generation",
                                value=header.workers_target)
        yield GaugeMetricFamily("lancelotd_last_reload_ok", "1 unless the last reload failed",
                                value=int(bool(header.last_reload_ok)))
        yield GaugeMetricFamily("lancelotd_upgrade_failed", "1 after a USR2 upgrade of this master failed "
                                "(the old master serves on)", value=master.get("upgrade_failed", 0))
        yield GaugeMetricFamily("lancelotd_start_time_seconds", "When the master started (Unix time)",
                                value=header.started)

    def processes(self, header: Header, slots: list) -> Iterator[Metric]:
        """Memory and descriptors of every process, labelled as the worker series are."""
        memory = GaugeMetricFamily("lancelotd_process_memory_bytes", "Process memory (rss, uss)",
                                   labels=["role", "worker", "generation", "kind"])
        fds = GaugeMetricFamily("lancelotd_process_open_fds", "Open file descriptors",
                                labels=["role", "worker", "generation"])
        max_fds = GaugeMetricFamily("lancelotd_process_max_fds", "RLIMIT_NOFILE (soft): at it, a worker "
                                    "pauses accepting", labels=["role", "worker", "generation"])
        sums: dict[tuple[str, str, str], list[int]] = {}
        processes = [(("master", "", ""), self.master_pid), *(
            (("worker", str(slot.number), relative_generation(slot.generation, header.generation)), slot.pid)
            for slot in slots)]
        for key, pid in processes:
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    info, opened = proc.memory_full_info(), proc.num_fds()
                limit = proc.rlimit(psutil.RLIMIT_NOFILE)[0]
            except (psutil.Error, OSError):
                continue
            total = sums.setdefault(key, [0, 0, 0, 0])
            for i, value in enumerate((info.rss, info.uss, opened, limit)):
                total[i] = max(total[i], value) if i == 3 else total[i] + value
        for key, (rss, uss, opened, limit) in sorted(sums.items()):
            memory.add_metric([*key, "rss"], rss)
            memory.add_metric([*key, "uss"], uss)
            fds.add_metric(list(key), opened)
            max_fds.add_metric(list(key), limit)
        yield from (memory, fds, max_fds)


class Scrape:
    """One scraper's exchange: its request as it arrives, then the response as the kernel takes it."""

    __slots__ = ("sock", "request", "response", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.request = bytearray()
        self.response: memoryview | None = None  # None while the request is still coming
        self.deadline = deadline


class MetricsServer:
    """A tiny non-blocking HTTP responder for GET /metrics, driven by the master loop.

    It can neither stall nor spin the master: every socket is non-blocking
    and a response goes out as the kernel takes it (the loop watches the
    socket for writing in between); at most MAX_SCRAPERS exchanges run at
    once, and at the bound a new connection evicts the oldest exchange (as
    the agent port does), so a probe (/live, /ready) never waits behind idle
    or slow connections: it is accepted and, its request being in already,
    answered in the same loop turn.  A request must be in within REQUEST_PHASE (1 s), the
    whole exchange done within REQUEST_TIMEOUT (a scraper that never reads);
    what an exchange held - a request of MAX_REQUEST at most and one
    response - goes with it.  Meant for loopback or an internal network all
    the same: the scrape itself costs the master a scoreboard read and a
    psutil call per process.
    """

    def __init__(self, address: str, backlog: int, collector: ScoreboardCollector) -> None:
        self.address = address
        self.listener = bind(address, backlog)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)  # type: ignore[arg-type]
        self.clients: dict[int, Scrape] = {}
        # Paths besides /metrics (the master's /ready and /live): path -> (status, body) or None.
        self.probe: Callable[[bytes], tuple[str, bytes] | None] = lambda path: None
        log.info("metrics on http://%s/metrics", format_address(self.listener.getsockname()))

    def fds(self) -> list[int]:
        """To watch for reading: scrapers still sending, and the listener (always: see the bound)."""
        watched = [fd for fd, scrape in self.clients.items() if scrape.response is None]
        watched.append(self.listener.fileno())
        return watched

    def write_fds(self) -> list[int]:
        """To watch for writing: responses the kernel has not taken whole."""
        return [fd for fd, scrape in self.clients.items() if scrape.response is not None]

    def handle(self, readable: Collection[int], writable: Collection[int] = ()) -> None:
        now = time.monotonic()
        if self.listener.fileno() in readable:
            self._accept(now)
        for fd in readable:
            scrape = self.clients.get(fd)
            if scrape is not None and scrape.response is None:
                self._read(fd, scrape)
        for fd in writable:
            scrape = self.clients.get(fd)
            if scrape is not None and scrape.response is not None:
                self._write(fd, scrape)
        for fd, scrape in list(self.clients.items()):
            if now > scrape.deadline:
                self._drop(fd)

    def _accept(self, now: float) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE...: the listener stays readable; the next turn retries
                log.warning("metrics: accept failed: %s", e.strerror)
                return
            sock.setblocking(False)
            if len(self.clients) >= MAX_SCRAPERS:
                self._drop(next(iter(self.clients)))  # the oldest (insertion order)
            scrape = Scrape(sock, now + REQUEST_PHASE)
            self.clients[sock.fileno()] = scrape
            self._read(sock.fileno(), scrape)  # a probe's request is usually in already

    def _read(self, fd: int, scrape: Scrape) -> None:
        try:
            data = scrape.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._drop(fd)
            return
        scrape.request += data
        buf = scrape.request
        if b"\r\n\r\n" in buf or b"\n\n" in buf or not data or len(buf) > MAX_REQUEST:
            scrape.deadline = time.monotonic() + REQUEST_TIMEOUT
            scrape.response = memoryview(self.response(bytes(buf)))
            scrape.request = bytearray()
            self._write(fd, scrape)

    def _write(self, fd: int, scrape: Scrape) -> None:
        assert scrape.response is not None
        try:
            sent = scrape.sock.send(scrape.response)
        except BlockingIOError:
            return
        except OSError:
            self._drop(fd)
            return
        scrape.response = scrape.response[sent:]
        if not scrape.response:
            try:
                scrape.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._drop(fd)

    def response(self, request: bytes) -> bytes:
        """The whole HTTP response to `request` (routing: what is served where)."""
        parts = request.split(b" ", 2)
        path = parts[1].split(b"?")[0] if len(parts) > 1 else b""
        probed = self.probe(path) if parts[0] == b"GET" else None
        if probed:
            (status, body), ctype = probed, "text/plain"
        elif parts[0] != b"GET" or path not in (b"/metrics", b"/"):
            status, ctype, body = "404 Not Found", "text/plain", b"not found: try /metrics, /ready, /live\n"
        else:
            try:
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
            except Exception as e:  # a broken scrape must never take the master down
                log.exception("metrics: collecting failed")
                status, ctype, body = "500 Internal Server Error", "text/plain", f"{e}\n".encode()
        head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        return head + body

    def _drop(self, fd: int) -> None:
        self.clients.pop(fd).sock.close()

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        self.listener.close()
