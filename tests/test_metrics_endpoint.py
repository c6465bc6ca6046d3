"""Issue 11, item 5: the metrics endpoint cannot stall or spin the master.

The master serves /metrics from its own select() loop.  Hostile scrapers - many that connect
and send nothing, some that send a request and never read the answer - must cost it nothing:
it keeps reaping (a SIGKILLed worker is replaced promptly), reloading (`lancelotd reload`
returns in time) and idling (its CPU time barely moves), and once they leave a scrape works.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time

import psutil
from helpers import lancelotd_cli, scaled, tcp_sockets, wait_for, wait_pool, workers_of
from test_status import metrics_url, scrape

MAX_SCRAPERS = 8  # lancelotd.metrics.MAX_SCRAPERS


def open_silent(port: int, count: int) -> list[socket.socket]:
    """`count` connections to the port that send nothing (non-blocking connects: past the
    listen queue a connect would wait for SYN retries)."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", port))
        assert code in (0, errno.EINPROGRESS), os.strerror(code)
        socks.append(sock)
    return socks


def open_non_reader(port: int) -> socket.socket:
    """A scraper that sends its request and never reads a byte of the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the smallest window the kernel allows
    sock.settimeout(scaled(5))
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    return sock


def held_by(pid: int, port: int) -> int:
    """Connections to `port` the process holds (accepted, not yet closed)."""
    return sum(1 for c in tcp_sockets(pid)
               if c.laddr and c.laddr.port == port and c.raddr)


def test_hostile_scrapers_cost_the_master_nothing(start_daemon):
    d = start_daemon(config='[server]\nworkers = 2\nmetrics_bind = "127.0.0.1:0"\n', workers=2)
    master = psutil.Process(d.proc.pid)
    url = metrics_url(d, master.pid)
    port = int(url.split(":")[2].split("/")[0])
    scrape(url)
    # (The non-readers first: once the silent ones fill the listen queue, a connect() waits.)
    hostile = [open_non_reader(port) for _ in range(5)] + open_silent(port, 100)
    try:
        # The master takes MAX_SCRAPERS of them, and leaves the rest in the listen queue.
        wait_for(lambda: held_by(master.pid, port) >= MAX_SCRAPERS, 5, "the master to take scrapers")
        before = master.cpu_times()
        start = time.monotonic()
        time.sleep(1.0)  # the observation window: a master that spins burns all of it
        spent = sum(master.cpu_times()[:2]) - sum(before[:2])
        elapsed = time.monotonic() - start
        assert spent < scaled(0.2) * elapsed, f"the master used {spent:.2f}s of CPU in {elapsed:.2f}s"
        assert held_by(master.pid, port) <= MAX_SCRAPERS

        # It reaps and replaces a killed worker promptly...
        victim = next(iter(wait_pool(master.pid, 2)))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in (pool := workers_of(master.pid)) and len(pool) == 2, 3,
                 "the killed worker to be replaced")
        # ...and reloads in time.
        started = time.monotonic()
        result = lancelotd_cli("reload", "--pid-file", str(d.pid_file), timeout=15)
        assert result.returncode == 0, result.stdout + result.stderr
        assert time.monotonic() - started < scaled(8)
    finally:
        for sock in hostile:
            sock.close()
    # Once they are gone (or timed out), scrapes work again.
    def scraped() -> bool:
        try:
            return bool(scrape(url))
        except OSError:  # URLError, a reset: still busy with the queue they left
            return False
    wait_for(scraped, 15, "a scrape to succeed")
