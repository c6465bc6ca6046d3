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
import threading
import time

import psutil
from helpers import (
    CheckedThread,
    held,
    lancelotd_cli,
    metrics_url,
    scaled,
    scrape,
    wait_for,
    wait_pool,
    workers_of,
)

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
        wait_for(lambda: held(master.pid, port, None) >= MAX_SCRAPERS, 5, "the master to take scrapers")
        before = master.cpu_times()
        start = time.monotonic()
        time.sleep(1.0)  # the observation window: a master that spins burns all of it
        spent = sum(master.cpu_times()[:2]) - sum(before[:2])
        elapsed = time.monotonic() - start
        # A share of the CPU: a spinning master burns all of it, so the factor may stretch the share
        # allowed to half, never to all (from LANCELOTD_TEST_TIME_FACTOR=5 on the test could not fail).
        share = min(scaled(0.2), 0.5)
        assert spent < share * elapsed, f"the master used {spent:.2f}s of CPU in {elapsed:.2f}s"
        assert held(master.pid, port, None) <= MAX_SCRAPERS

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


def probe(port: int, path: bytes) -> tuple[float, bytes]:
    """(seconds, response) of one GET on a new connection: connect, request, read to the close."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) as sock:
        sock.sendall(b"GET " + path + b" HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return time.monotonic() - started, data


class Crowd:
    """50 idle connections and 10 slow scrapers (a byte every 0.2 s) on a port, re-opened when dropped."""

    def __init__(self, port: int, idle: int = 50, slow: int = 10) -> None:
        self.port, self.idle, self.slow = port, idle, slow
        self.stop = threading.Event()
        self.thread = CheckedThread(self.run, name="crowd")
        self.opened = 0

    def __enter__(self) -> Crowd:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if exc[0] is None:
            self.thread.finish()
        else:  # the test failed already: that is the news
            self.thread.join(scaled(10))

    def run(self) -> None:
        import select
        request = b"GET /metrics HTTP/1.0\r\n\r\n"
        idle = open_silent(self.port, self.idle)
        slow = {sock: 0 for sock in open_silent(self.port, self.slow)}
        self.opened = len(idle) + len(slow)
        try:
            while not self.stop.wait(0.2):  # unscaled: the period of the slow clients
                readable, _, _ = select.select([*idle, *slow], [], [], 0)
                for sock in readable:  # dropped by the server (EOF or reset): come back
                    if sock in slow:
                        del slow[sock]
                        sock.close()
                        slow.update(dict.fromkeys(open_silent(self.port, 1), 0))
                    else:
                        idle.remove(sock)
                        sock.close()
                        idle += open_silent(self.port, 1)
                    self.opened += 1
                for sock, sent in list(slow.items()):
                    try:
                        sock.send(request[sent:sent + 1])
                        slow[sock] = min(sent + 1, len(request) - 1)  # never quite finishes
                    except OSError:
                        pass
        finally:
            for sock in [*idle, *slow]:
                sock.close()


def test_probes_never_wait_behind_idle_and_slow_scrapers(start_daemon):
    """Issue 19, item 5: /live and /ready within 100 ms while 50 idle + 10 slow connections hold the port."""
    d = start_daemon(config='[server]\nworkers = 1\nmetrics_bind = "127.0.0.1:0"\n', workers=1)
    master = psutil.Process(d.proc.pid)
    url = metrics_url(d, master.pid)
    port = int(url.split(":")[2].split("/")[0])
    with Crowd(port) as crowd:
        # (Evicted ones come back at once: the master is never without a crowd to evict.)
        wait_for(lambda: crowd.opened >= 60 and held(master.pid, port, None), 5,
                 "the crowd to reach the master")
        time.sleep(0.5)
        times = []
        for i in range(20):
            took, response = probe(port, b"/live" if i % 2 else b"/ready")
            assert response.startswith(b"HTTP/1.0 200"), response
            times.append(took)
        assert held(master.pid, port, None) <= MAX_SCRAPERS
    assert max(times) < scaled(0.1), f"probes took up to {max(times) * 1000:.0f} ms: {times}"
