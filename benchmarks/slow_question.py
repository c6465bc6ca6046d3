#!/usr/bin/env python3
"""What a question sent a byte at a time costs the worker's parser, by max_question_bytes.

A client may send its question one byte per segment.  Each read then hands the parser one more
byte of an unfinished question; that must cost time in proportion to the new byte, not to the
question so far (which would make a 64 KiB question cost about a second of CPU).  This feeds
protocol.Session exactly as the worker does (one feed() per read) and prints the CPU time per
question and per byte for each size: flat per byte is linear.

    python benchmarks/slow_question.py [--sizes 1024 8192 65536] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

from lancelotd.protocol import AnswerTable, Session


def one_question(size: int) -> float:
    """CPU seconds to parse a question of `size` bytes (its '?' included) fed a byte per read."""
    table = AnswerTable({"Q?": "A."}, "No idea.", size)
    question = b"x" * (size - 1) + b"?"
    session = Session(table)
    started = time.process_time()
    out = b""
    for i in range(len(question)):
        out, close = session.feed(question[i:i + 1])
        assert not close, out
    spent = time.process_time() - started
    assert out == b"No idea.", out
    return spent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192, 65536])
    p.add_argument("--repeat", type=int, default=3, help="runs per size; the best is printed")
    args = p.parse_args()
    print(f"{'max_question_bytes':>18} {'CPU ms/question':>16} {'CPU ns/byte':>12}")
    for size in args.sizes:
        best = min(one_question(size) for _ in range(args.repeat))
        print(f"{size:>18} {best * 1e3:>16.2f} {best / size * 1e9:>12.0f}")


if __name__ == "__main__":
    main()
