#!/usr/bin/env python3
"""chaos.py's own clients: tests/pyload.py's generator, told what each failure hit.

    python chaos_probe.py -p PORT -c 25 -d 600 [-r] --out FILE

The same closed loop, options and result line as tests/pyload.py (it subclasses its Generator),
with two additions for the chaos benchmark:

* every failure is recorded with its time (time.monotonic_ns(), the same clock in every process),
  its kind, errno, the client's local address (host:port) and when that connection was made
  (t_connect: when this loop saw it done; t_dial: when connect() was called);
  chaos.py matches the address against the connections each SIGKILLed worker held at the
  moment of the kill, so a failure is either attributed to a kill or a bug;
* every fourth question is COLOUR_QUESTION, whose answer chaos.py changes at each HUP
  ("Colour number N."): any N is accepted here, and its first sighting is recorded; chaos.py then
  checks that N had been published (written to the config) before it was seen.

Writes {"result": line, "failures": [...], "colours": {N: [count, first_seen_ns, last_seen_ns]}}
to --out, and prints the result line.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import pyload  # noqa: E402  (tests/pyload.py: the generator this extends)

COLOUR_QUESTION = b"What colour is the day?"
COLOUR_ANSWER = re.compile(rb"Colour number (\d+)\.")
COLOUR_MAX = 64  # bytes: "Colour number N." is far shorter
COLOUR = len(pyload.QUESTIONS)  # the question index used for the colour question


class Probe(pyload.Generator):
    def __init__(self, args) -> None:
        super().__init__(args)
        self.failures: list[dict] = []
        self.colours: dict[int, list[int]] = {}  # N -> [count, first seen, last seen]
        for conn in self.conns:
            conn.port = ""  # the local address, "HOST:PORT", of its current connection
            conn.t_connect = 0
            conn.t_dial = 0  # when connect() was called: the server may accept before we see it done

    def connect(self, conn: pyload.Conn, now: int) -> None:
        conn.t_dial = now
        super().connect(conn, now)

    def connected(self, conn: pyload.Conn, now: int) -> None:
        try:
            host, port = conn.sock.getsockname()[:2]
            conn.port = f"{host}:{port}"
        except OSError:
            conn.port = ""
        conn.t_connect = now
        super().connected(conn, now)

    def fail(self, conn: pyload.Conn, kind: str, err: int, now: int) -> None:
        if now >= self.t_measure:
            self.failures.append({"t": now, "kind": kind, "errno": err, "port": conn.port,
                                  "t_connect": conn.t_connect, "t_dial": conn.t_dial, "state": conn.state,
                                  "question": int(conn.qidx)})
        super().fail(conn, kind, err, now)

    def ask(self, conn: pyload.Conn, now: int, keep_start: bool) -> None:
        """pyload's ask, with the colour question as every fourth one."""
        step = conn.next_q % (COLOUR + 1)
        conn.next_q += 1
        conn.qidx = step
        question = COLOUR_QUESTION if step == COLOUR else pyload.QUESTIONS[step]
        conn.got = b""
        if not keep_start:
            conn.t_start = now
        conn.deadline = conn.t_start + self.timeout_ns
        try:
            sent = conn.sock.send(question)
        except OSError as e:
            self.fail(conn, pyload.category(e.errno or 0), e.errno or 0, now)
            return
        if sent != len(question):
            self.fail(conn, "other", 0, now)
            return
        conn.state = pyload.READING

    def readable(self, conn: pyload.Conn, now: int) -> None:
        if conn.qidx != COLOUR:
            super().readable(conn, now)
            return
        try:
            data = conn.sock.recv(COLOUR_MAX - len(conn.got))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.fail(conn, pyload.category(e.errno or 0), e.errno or 0, now)
            return
        if not data:
            self.fail(conn, "reset", 0, now)
            return
        conn.got += data
        if b"." not in conn.got:
            if len(conn.got) >= COLOUR_MAX or not b"Colour number ".startswith(conn.got[:14]):
                self.fail(conn, "wrong", 0, now)
            return
        m = COLOUR_ANSWER.fullmatch(conn.got)
        if m is None:  # another answer, or a byte after the "."
            self.fail(conn, "wrong", 0, now)
            return
        if now >= self.t_measure:
            seen = self.colours.setdefault(int(m.group(1)), [0, now, now])
            seen[0] += 1
            seen[2] = now
        self.record_ok(conn, now)
        if self.args.per_request:
            self.close(conn)
            self.connect(conn, now)
        else:
            self.ask(conn, now, keep_start=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    out = None
    if "--out" in argv:
        i = argv.index("--out")
        out = Path(argv[i + 1])
        del argv[i:i + 2]
    args = pyload.parse(argv)
    pyload.raise_fd_limit(args.conns)
    probe = Probe(args)
    try:
        probe.run()
    finally:
        line = probe.result(time.monotonic_ns() - probe.t0)
        if out is not None:
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"result": line, "failures": probe.failures,
                                       "colours": probe.colours}))
            tmp.replace(out)
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main())
