#!/usr/bin/env python3
"""A peer to measure lancelotd against: an asyncio Protocol server, prefork, on asyncio or uvloop.

    python benchmarks/peer_asyncio.py PORT WORKERS [--loop asyncio|uvloop]

What a Python developer would write instead of lancelotd: a master binds 127.0.0.1:PORT and
forks WORKERS processes, each running `loop.create_server(sock=listener)` on the shared
listener, with the protocol of peer_protocol.py (pipelining, unfinished questions, errors).
No limits, no idle timeouts, no lifecycle.  uvloop is the benchmark's optional dependency
(pip install -e '.[bench]').  Prints READY when its workers are forked; SIGTERM stops it.
Only ever listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from peer_protocol import ANSWERS, answer, prefork


class Lancelot(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.rest = b""

    def data_received(self, data: bytes) -> None:
        if not self.rest:
            out = ANSWERS.get(data)
            if out is not None:  # a read that is one known question
                self.transport.write(out)
                return
        out, self.rest, close = answer(self.rest + data)
        if out:
            self.transport.write(out)
        if close:
            self.transport.close()


def serve(listener: socket.socket, loop_kind: str) -> None:
    if loop_kind == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    loop.run_until_complete(loop.create_server(Lancelot, sock=listener, backlog=4096))
    loop.run_forever()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("workers", type=int)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = p.parse_args()
    if args.loop == "uvloop":
        import uvloop  # noqa: F401  (fail here, before forking, if it is not installed)
    return prefork(args.port, args.workers, lambda listener: serve(listener, args.loop),
                   f"peer_asyncio loop={args.loop}")


if __name__ == "__main__":
    sys.exit(main())
