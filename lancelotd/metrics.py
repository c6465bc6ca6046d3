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
from collections.abc import Callable, Iterator

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .agent import BALANCE_NAMES
from .logs import log
from .scoreboard import STATE_NAMES, Header, Scoreboard
from .sockets import bind, format_address

REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192


class ScoreboardCollector:
    """Turns one scoreboard read into metric families at each scrape."""

    def __init__(self, board: Scoreboard, header: Callable[[], Header], master_pid: int) -> None:
        self.board = board
        self.header = header
        self.master_pid = master_pid

    def collect(self) -> Iterator[Metric]:
        header = self.header()
        slots = [slot for _, slot in self.board.slots()]
        totals = self.board.totals()
        labels = ["worker", "generation", "pid"]

        answered = CounterMetricFamily("lancelotd_worker_questions_answered", "Questions answered",
                                       labels=labels)
        conns = GaugeMetricFamily("lancelotd_worker_connections", "Open connections", labels=labels)
        errors = CounterMetricFamily("lancelotd_worker_errors", "Protocol errors and idle timeouts",
                                     labels=[*labels, "kind"])
        for slot in slots:
            values = [str(slot.number), str(slot.generation), str(slot.pid)]
            c = slot.counters
            assert c is not None
            answered.add_metric(values, c.answered)
            conns.add_metric(values, slot.connections)
            for kind in ("unknown", "too_long", "not_ascii", "timeouts"):
                errors.add_metric([*values, kind], getattr(c, kind))
        yield from (answered, conns, errors)

        yield CounterMetricFamily("lancelotd_questions_answered", "Questions answered by all workers, "
                                  "exited ones included", value=totals.answered)
        yield CounterMetricFamily("lancelotd_connections_accepted", "Connections accepted",
                                  value=totals.accepted)
        yield GaugeMetricFamily("lancelotd_connections", "Open connections",
                                value=sum(slot.connections for slot in slots))
        total_errors = CounterMetricFamily("lancelotd_errors", "Errors by kind", labels=["kind"])
        for kind in ("unknown", "too_long", "not_ascii", "timeouts"):
            total_errors.add_metric([kind], getattr(totals, kind))
        yield total_errors
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

        memory = GaugeMetricFamily("lancelotd_process_memory_bytes", "Process memory (rss, uss)",
                                   labels=["role", "pid", "kind"])
        for role, pid in [("master", self.master_pid), *(("worker", slot.pid) for slot in slots)]:
            try:
                info = psutil.Process(pid).memory_full_info()
            except (psutil.Error, OSError):
                continue
            memory.add_metric([role, str(pid), "rss"], info.rss)
            memory.add_metric([role, str(pid), "uss"], info.uss)
        yield memory


class MetricsServer:
    """A tiny non-blocking HTTP responder for GET /metrics, driven by the master loop."""

    def __init__(self, address: str, backlog: int, collector: ScoreboardCollector) -> None:
        self.address = address
        self.listener = bind(address, backlog)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)  # type: ignore[arg-type]
        self.clients: dict[int, tuple[socket.socket, bytearray, float]] = {}
        # Paths besides /metrics (the master's /ready and /live): path -> (status, body) or None.
        self.probe: Callable[[bytes], tuple[str, bytes] | None] = lambda path: None
        log.info("metrics on http://%s/metrics", format_address(self.listener.getsockname()))

    def fds(self) -> list[int]:
        return [self.listener.fileno(), *self.clients]

    def handle(self, readable: list[int]) -> None:
        now = time.monotonic()
        if self.listener.fileno() in readable:
            self._accept(now)
        for fd in readable:
            if fd in self.clients:
                self._read(fd)
        for fd, (_, _, deadline) in list(self.clients.items()):
            if now > deadline:
                self._drop(fd)

    def _accept(self, now: float) -> None:
        while len(self.clients) < 64:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("metrics: accept failed: %s", e.strerror)
                return
            sock.setblocking(False)
            self.clients[sock.fileno()] = (sock, bytearray(), now + REQUEST_TIMEOUT)

    def _read(self, fd: int) -> None:
        sock, buf, _ = self.clients[fd]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._drop(fd)
            return
        buf += data
        if b"\r\n\r\n" in buf or b"\n\n" in buf or not data or len(buf) > MAX_REQUEST:
            self._respond(sock, bytes(buf))
            self._drop(fd)

    def _respond(self, sock: socket.socket, request: bytes) -> None:
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
        try:
            sock.setblocking(True)
            sock.settimeout(1.0)  # a scrape is a few kB: the send buffer takes it at once
            sock.sendall(head + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _drop(self, fd: int) -> None:
        sock, _, _ = self.clients.pop(fd)
        sock.close()

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        self.listener.close()
