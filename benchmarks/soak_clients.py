#!/usr/bin/env python3
"""soak.py's own clients, each failure recorded with the connection it hit (as chaos_probe.py's).

    python soak_clients.py probe -p PORT -c 10 -d 3600 [-r] --out FILE   # retries once
    python soak_clients.py mixed -p PORT -d 3600 --out FILE [--slow 4 --flood 1 --idle 20 ...]

probe: chaos_probe.Probe (tests/pyload.py's closed loop, the colour question every fourth) with
the client contract of docs/PROMISES.md §8: a question whose connection ends unanswered is asked
once more on a new connection.  Both failures are recorded (the second with "retry": true: the
question is lost).

mixed: one thread per connection, of three kinds:
  slow   pipelines --batch questions at once, reads their answers 256 bytes every 20 ms through a
         4 KiB receive buffer (so the server's send queue fills and it must stop reading), then again;
  flood  sends '?' bytes as fast as the server takes them, 4096 at a time, and reads every
         "I don't know that." back;
  idle   asks once, sits idle for --idle-min..--idle-max seconds (below idle_timeout), asks again.

Both write {"result": line, "failures": [...], "colours": {...}, "answered": {kind: {BIN: n}},
"retries": {...}} to --out; a BIN is time.monotonic_ns() // BIN_NS, the clock every process shares.
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos_probe  # noqa: E402  (it puts tests/ on sys.path for pyload)
import pyload  # noqa: E402

BIN_NS = 10_000_000_000  # answers are counted in 10 s bins
RESERVOIR = 200_000  # latencies kept for the probe's percentiles
UNKNOWN = b"I don't know that."
QUESTIONS = pyload.QUESTIONS
ANSWERS = pyload.ANSWERS
CONNECTING, TALKING = 1, 2  # a failure's state; 1 is chaos_report's CONNECTING (not attributable)


class RetryProbe(chaos_probe.Probe):
    """chaos_probe.Probe, asking a failed question once more on a new connection.

    pyload keeps every latency (an hour at 5,000 answers/s: 18 million ints, over 600 MB): this
    keeps a uniform sample of RESERVOIR of them for the percentiles, and counts the answers."""

    def __init__(self, args) -> None:
        super().__init__(args)
        self.bins: Counter = Counter()
        self.retries = Counter()  # asked again; rescued (the retry answered); lost (it failed too)
        self.answers = 0
        self.rng = random.Random()
        for conn in self.conns:
            conn.retrying = False

    def fail(self, conn: pyload.Conn, kind: str, err: int, now: int) -> None:
        retry = conn.retrying
        if now >= self.t_measure:
            self.retries["lost" if retry else "asked again"] += 1
        conn.retrying = not retry
        if not retry and conn.state == pyload.READING:
            conn.next_q -= 1  # ask() takes the next question: this one, again
        super().fail(conn, kind, err, now)
        if self.failures and self.failures[-1]["t"] == now:
            self.failures[-1]["retry"] = retry

    def record_ok(self, conn: pyload.Conn, now: int) -> None:
        if conn.retrying:
            conn.retrying = False
            self.retries["rescued"] += 1
        if now < self.t_measure:
            return
        self.bins[now // BIN_NS] += 1
        self.answers += 1
        super().record_ok(conn, now)
        if len(self.latencies) > RESERVOIR:  # Algorithm R: the new one replaces a random one, or not
            j = self.rng.randrange(self.answers)
            if j < RESERVOIR:
                self.latencies[j] = self.latencies[-1]
            self.latencies.pop()

    def result(self, wall_ns: int) -> str:
        """pyload's line, with the answers counted (its percentiles are the sample's)."""
        fields = dict(token.split("=", 1) for token in super().result(wall_ns).split())
        fields["requests"] = str(self.answers)
        fields["rps"] = f"{self.answers / ((self.t_end - self.t_measure) / 1e9):.1f}"
        return " ".join(f"{key}={value}" for key, value in fields.items())


class Mixed:
    """The slow readers, the flooder and the idle connections: a thread each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_end = time.monotonic_ns() + int(args.duration * 1e9)
        self.lock = threading.Lock()
        self.failures: list[dict] = []
        self.answered: dict[str, Counter] = {"slow": Counter(), "flood": Counter(), "idle": Counter()}
        self.stop = threading.Event()

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic_ns() < self.t_end

    def count(self, kind: str, n: int) -> None:
        with self.lock:
            self.answered[kind][time.monotonic_ns() // BIN_NS] += n

    def fail(self, kind: str, what: str, err: int, state: int, port: str, t_connect: int) -> None:
        with self.lock:
            self.failures.append({"t": time.monotonic_ns(), "kind": what, "errno": err, "port": port,
                                  "t_connect": t_connect, "state": state, "question": 0, "client": kind})

    def connect(self, kind: str, rcvbuf: int = 0) -> tuple[socket.socket, str, int] | None:
        t = time.monotonic_ns()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(self.args.timeout)
        try:
            sock.connect((self.args.host, self.args.port))
        except OSError as e:
            sock.close()
            self.fail(kind, pyload.category(e.errno or 0) if e.errno else "timeout", e.errno or 0,
                      CONNECTING, "", t)
            time.sleep(0.1)
            return None
        host, port = sock.getsockname()[:2]
        return sock, f"{host}:{port}", t

    def read_exactly(self, sock: socket.socket, expected: bytes, chunk: int, pause: float) -> None:
        """Read `expected` back, `chunk` bytes at a time with `pause` between reads; raise on a
        difference (ValueError), EOF (ConnectionResetError) or a timeout."""
        got = 0
        while got < len(expected):
            data = sock.recv(min(chunk, len(expected) - got))
            if not data:
                raise ConnectionResetError(0, "EOF")
            if data != expected[got:got + len(data)]:
                raise ValueError("wrong answer")
            got += len(data)
            if pause:
                time.sleep(pause)

    def session(self, kind: str, body, rcvbuf: int = 0) -> None:
        """Connect, run `body(sock)` until the run ends or it fails; record the failure; again."""
        while self.running():
            made = self.connect(kind, rcvbuf)
            if made is None:
                continue
            sock, port, t_connect = made
            try:
                body(sock)
            except ValueError:
                self.fail(kind, "wrong", 0, TALKING, port, t_connect)
            except TimeoutError:
                self.fail(kind, "timeout", errno.ETIMEDOUT, TALKING, port, t_connect)
            except OSError as e:
                self.fail(kind, pyload.category(e.errno or errno.ECONNRESET), e.errno or 0, TALKING, port,
                          t_connect)
            finally:
                sock.close()

    def slow(self, sock: socket.socket) -> None:
        n = self.args.batch
        questions = b"".join(QUESTIONS[i % 3] for i in range(n))
        answers = b"".join(ANSWERS[i % 3] for i in range(n))
        while self.running():
            sock.sendall(questions)  # blocks while the server, its queue full, stops reading
            self.read_exactly(sock, answers, 256, 0.02)
            self.count("slow", n)

    def flood(self, sock: socket.socket) -> None:
        while self.running():
            sock.sendall(b"?" * 4096)
            self.read_exactly(sock, UNKNOWN * 4096, 1 << 16, 0)
            self.count("flood", 4096)

    def idle(self, sock: socket.socket) -> None:
        rng = random.Random()
        i = 0
        while self.running():
            sock.sendall(QUESTIONS[i % 3])
            self.read_exactly(sock, ANSWERS[i % 3], 64, 0)
            self.count("idle", 1)
            i += 1
            pause = rng.uniform(self.args.idle_min, self.args.idle_max)
            if self.stop.wait(min(pause, max(0.0, (self.t_end - time.monotonic_ns()) / 1e9))):
                return

    def run(self) -> None:
        threads = []
        for kind, number, rcvbuf in (("slow", self.args.slow, 4096), ("flood", self.args.flood, 0),
                                     ("idle", self.args.idle, 0)):
            for _ in range(number):
                body = getattr(self, kind)
                threads.append(threading.Thread(target=self.session, args=(kind, body, rcvbuf), daemon=True))
        for t in threads:
            t.start()
            time.sleep(0.01)
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.5)
        finally:
            self.stop.set()

    def result(self) -> str:
        totals = {k: sum(v.values()) for k, v in self.answered.items()}
        by_kind = Counter(f["client"] for f in self.failures)
        return (f"label=mixed slow={self.args.slow} flood={self.args.flood} idle={self.args.idle} "
                + " ".join(f"answered_{k}={v}" for k, v in totals.items()) + " "
                + " ".join(f"failures_{k}={by_kind[k]}" for k in totals))


def write(out: Path | None, data: dict) -> None:
    if out is not None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    mode, argv = argv[0], argv[1:]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if mode == "probe":
        out = None
        if "--out" in argv:
            i = argv.index("--out")
            out = Path(argv[i + 1])
            del argv[i:i + 2]
        args = pyload.parse(argv)
        pyload.raise_fd_limit(args.conns)
        probe = RetryProbe(args)
        try:
            probe.run()
        except KeyboardInterrupt:
            pass
        finally:
            line = probe.result(time.monotonic_ns() - probe.t0)
            write(out, {"result": line, "failures": probe.failures, "colours": probe.colours,
                        "answered": {"probe-cpr" if args.per_request else "probe-persistent": probe.bins},
                        "retries": probe.retries})
            print(line, flush=True)
        return 0
    p = argparse.ArgumentParser(description="soak.py's slow readers, '?' flooder and idle connections")
    p.add_argument("-H", dest="host", default="127.0.0.1")
    p.add_argument("-p", dest="port", type=int, required=True)
    p.add_argument("-d", dest="duration", type=float, required=True)
    p.add_argument("--slow", type=int, default=4)
    p.add_argument("--batch", type=int, default=1000, help="questions a slow reader pipelines at once")
    p.add_argument("--flood", type=int, default=1)
    p.add_argument("--idle", type=int, default=20)
    p.add_argument("--idle-min", type=float, default=5.0)
    p.add_argument("--idle-max", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a read or write may wait")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    mixed = Mixed(args)
    try:
        mixed.run()
    except KeyboardInterrupt:
        mixed.stop.set()
    finally:
        line = mixed.result()
        write(args.out, {"result": line, "failures": mixed.failures, "colours": {},
                         "answered": mixed.answered, "retries": {}})
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
