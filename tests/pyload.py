"""Closed-loop load generator in Python: the fallback for benchmarks/c/loadgen.c.

    python pyload.py -H 127.0.0.1 -p 1060 -c 50 -d 3 [-r] [-t threads] [-w s] [-T ms] [-l label] [-S n]

It takes loadgen.c's options and prints loadgen.c's result line (one line of
key=value pairs: rps, requests, errors, err_wrong, err_reset, err_refused,
err_timeout, err_other, p50_us, p99_us, ...), so tests/loadgen.py reads either.
One thread, one selector, C connections in a closed loop: persistent (question
after question on one connection) or connect-per-request (-r).  Every answer is
checked byte for byte; errors are classified as loadgen.c does:

* wrong   - an answer that differs from the expected one, or has a byte too many;
* reset   - ECONNRESET, EPIPE, ECONNABORTED, or EOF before the whole answer;
* refused - ECONNREFUSED (then a 10 ms back-off before reconnecting);
* timeout - no whole answer within -T ms of the request's start (connect included);
* other   - anything else (then the 10 ms back-off).

-t is accepted and echoed (a Python process uses one thread: it is slower than the
C tool, which the tests do not depend on: they count errors, not rates).
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import selectors
import socket
import sys
import time

QUESTIONS = (b"What is your name?", b"What is your quest?", b"What is your favorite color?")
ANSWERS = (b"My name is Sir Lancelot of Camelot.", b"To seek the Holy Grail.", b"Blue.")
CATEGORIES = ("wrong", "reset", "refused", "timeout", "other")
BACKOFF_NS = 10_000_000  # after refused / other errors
SCAN_NS = 5_000_000  # timeouts and back-off expiry are checked this often
IP_BIND_ADDRESS_NO_PORT = 24  # <linux/in.h>

IDLE, CONNECTING, READING, BACKOFF = range(4)


def category(err: int) -> str:
    if err == errno.ECONNREFUSED:
        return "refused"
    if err in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
        return "reset"
    if err == errno.ETIMEDOUT:
        return "timeout"
    return "other"


class Conn:
    """One of the C client slots (in -r mode, the sequence of short connections it opens)."""

    def __init__(self, number: int) -> None:
        self.sock: socket.socket | None = None
        self.state = IDLE
        self.next_q = number  # spread the questions across the slots
        self.qidx = 0
        self.got = b""
        self.t_start = 0
        self.deadline = 0
        self.ok = 0


class Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.addr = (args.host, args.port)
        self.timeout_ns = int(args.timeout_ms * 1e6)
        self.sel = selectors.DefaultSelector()
        self.conns = [Conn(i) for i in range(args.conns)]
        self.errors = dict.fromkeys(CATEGORIES, 0)
        self.first_error = "-"
        self.latencies: list[int] = []  # microseconds
        self.max_ns = 0
        self.connects = 0
        self.src_rr = 0
        now = time.monotonic_ns()
        self.t0 = now
        self.t_measure = now + int(args.warmup * 1e9)
        self.t_end = self.t_measure + int(args.duration * 1e9)

    # --- outcomes ---------------------------------------------------------------

    def record_error(self, kind: str, err: int, now: int) -> None:
        if now < self.t_measure:
            return  # warm-up: not counted
        self.errors[kind] += 1
        if self.first_error == "-":
            reason = os.strerror(err) if err else ("eof" if kind == "reset" else "-")
            self.first_error = f"{kind}:{reason}".replace(" ", "_")

    def record_ok(self, conn: Conn, now: int) -> None:
        if now < self.t_measure:
            return
        conn.ok += 1
        latency = now - conn.t_start
        self.max_ns = max(self.max_ns, latency)
        self.latencies.append(latency // 1000)

    def close(self, conn: Conn) -> None:
        if conn.sock is not None:
            self.sel.unregister(conn.sock)
            conn.sock.close()
            conn.sock = None
        conn.state = IDLE

    def fail(self, conn: Conn, kind: str, err: int, now: int) -> None:
        self.record_error(kind, err, now)
        self.close(conn)
        if kind in ("refused", "other"):
            conn.state = BACKOFF
            conn.deadline = now + BACKOFF_NS

    # --- the request cycle --------------------------------------------------------

    def connect(self, conn: Conn, now: int) -> None:
        conn.t_start = now
        conn.deadline = now + self.timeout_ns
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            self.fail(conn, "other", e.errno or 0, now)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock = sock
        self.sel.register(sock, selectors.EVENT_WRITE, conn)
        try:
            if self.args.nsrc > 1:  # see loadgen.c: spread over 127.0.0.1..N against TIME_WAIT
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((f"127.0.0.{1 + self.src_rr % self.args.nsrc}", 0))
                self.src_rr += 1
            err = sock.connect_ex(self.addr)
        except OSError as e:
            self.fail(conn, "other", e.errno or 0, now)
            return
        if err == 0:
            self.connected(conn, now)
        elif err == errno.EINPROGRESS:
            conn.state = CONNECTING
        else:
            self.fail(conn, category(err), err, now)

    def connected(self, conn: Conn, now: int) -> None:
        assert conn.sock is not None
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(conn, category(err), err, now)
            return
        self.connects += 1
        self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
        self.ask(conn, now, keep_start=self.args.per_request)

    def ask(self, conn: Conn, now: int, keep_start: bool) -> None:
        """Send the next question (in -r mode the latency runs from the connect)."""
        assert conn.sock is not None
        conn.qidx = conn.next_q % len(QUESTIONS)
        conn.next_q += 1
        conn.got = b""
        if not keep_start:
            conn.t_start = now
        conn.deadline = conn.t_start + self.timeout_ns
        question = QUESTIONS[conn.qidx]
        try:
            sent = conn.sock.send(question)  # 18..28 bytes fit in an empty send buffer
        except OSError as e:
            self.fail(conn, category(e.errno or 0), e.errno or 0, now)
            return
        if sent != len(question):
            self.fail(conn, "other", 0, now)
            return
        conn.state = READING

    def readable(self, conn: Conn, now: int) -> None:
        assert conn.sock is not None
        expected = ANSWERS[conn.qidx]
        try:  # one byte more than expected, to see extra data
            data = conn.sock.recv(len(expected) + 1 - len(conn.got))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.fail(conn, category(e.errno or 0), e.errno or 0, now)
            return
        if not data:  # EOF before the whole answer
            self.fail(conn, "reset", 0, now)
            return
        conn.got += data
        if len(conn.got) < len(expected):
            if not expected.startswith(conn.got):
                self.fail(conn, "wrong", 0, now)
            return
        if conn.got != expected:
            self.fail(conn, "wrong", 0, now)
            return
        self.record_ok(conn, now)
        if self.args.per_request:
            self.close(conn)
            self.connect(conn, now)
        else:
            self.ask(conn, now, keep_start=False)

    # --- the loop ------------------------------------------------------------------

    def run(self) -> None:
        now = time.monotonic_ns()
        for conn in self.conns:
            self.connect(conn, now)
        next_scan = now + SCAN_NS
        while (now := time.monotonic_ns()) < self.t_end:
            wait = min(self.t_end - now, SCAN_NS)
            events = self.sel.select(wait / 1e9)
            for key, _ in events:
                conn: Conn = key.data
                if conn.sock is None:
                    continue
                now = time.monotonic_ns()
                if now >= self.t_end:
                    return
                if conn.state == CONNECTING:
                    self.connected(conn, now)
                elif conn.state == READING:
                    self.readable(conn, now)
            now = time.monotonic_ns()
            if now >= next_scan:
                next_scan = now + SCAN_NS
                self.scan(now)
            for key, _ in events:  # failed during the events: reconnect at once (not in back-off)
                if key.data.state == IDLE:
                    self.connect(key.data, now)

    def scan(self, now: int) -> None:
        for conn in self.conns:
            if conn.state in (CONNECTING, READING) and now >= conn.deadline:
                self.fail(conn, "timeout", 0, now)
                self.connect(conn, now)
            elif conn.state == IDLE or (conn.state == BACKOFF and now >= conn.deadline):
                self.connect(conn, now)

    # --- the result line ---------------------------------------------------------------

    def result(self, wall_ns: int) -> str:
        args, lat = self.args, sorted(self.latencies)
        measured = (self.t_end - self.t_measure) / 1e9
        requests, errors = len(lat), sum(self.errors.values())
        slots = [conn.ok for conn in self.conns]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        fields = {
            "label": args.label, "mode": "cpr" if args.per_request else "persistent", "host": args.host,
            "port": args.port, "conns": args.conns, "threads": args.threads,
            "duration_s": f"{measured:.3f}", "warmup_s": f"{args.warmup:.3f}", "nsrc": args.nsrc,
            "rps": f"{requests / measured:.1f}", "requests": requests, "errors": errors,
            **{f"err_{kind}": self.errors[kind] for kind in CATEGORIES},
            "connects": self.connects, "starved": slots.count(0), "slot_min": min(slots),
            "slot_max": max(slots),
            **{f"{name}_us": percentile(lat, p) for name, p in
               (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9))},
            "max_us": self.max_ns // 1000, "mean_us": f"{sum(lat) / len(lat) if lat else 0:.1f}",
            "lg_cpu_user_s": f"{usage.ru_utime:.3f}", "lg_cpu_sys_s": f"{usage.ru_stime:.3f}",
            "lg_wall_s": f"{wall_ns / 1e9:.3f}", "first_error": self.first_error,
        }
        return " ".join(f"{key}={value}" for key, value in fields.items())


def percentile(ordered: list[int], p: float) -> int:
    """Nearest rank, as loadgen.c computes it."""
    if not ordered:
        return 0
    rank = int(p / 100 * len(ordered) + 0.999999)
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-H", dest="host", default="127.0.0.1")
    parser.add_argument("-p", dest="port", type=int, default=1060)
    parser.add_argument("-c", dest="conns", type=int, default=1)
    parser.add_argument("-d", dest="duration", type=float, default=5.0)
    parser.add_argument("-t", dest="threads", type=int, default=1)
    parser.add_argument("-r", dest="per_request", action="store_true")
    parser.add_argument("-w", dest="warmup", type=float, default=0.0)
    parser.add_argument("-T", dest="timeout_ms", type=float, default=2000.0)
    parser.add_argument("-l", dest="label", default="-")
    parser.add_argument("-S", dest="nsrc", type=int, default=-1)
    args = parser.parse_args(argv)
    if (args.conns < 1 or args.threads < 1 or args.duration <= 0 or not 0 < args.port <= 65535
            or args.timeout_ms <= 0):
        parser.error("out of range")
    try:
        socket.inet_pton(socket.AF_INET, args.host)
    except OSError:
        parser.error(f"bad IPv4 address: {args.host}")
    args.threads = min(args.threads, args.conns)
    if args.nsrc < 0:
        args.nsrc = 16 if args.per_request and args.host.startswith("127.") else 1
    args.nsrc = min(args.nsrc, 254)
    return args


def raise_fd_limit(conns: int) -> None:
    """Room for C sockets and some slack, as loadgen.c makes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = conns + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY
                                                    else min(want, hard), hard))


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    raise_fd_limit(args.conns)
    generator = Generator(args)
    generator.run()
    print(generator.result(time.monotonic_ns() - generator.t0), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
