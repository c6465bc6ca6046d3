"""docs/PROTOCOL.md over real TCP: a real lancelotd on 127.0.0.1, real sockets, no mocks.

The tests that only ask share one daemon (`daemon`, started once for the module: each
closes what it opens and changes nothing the next could see); a test that needs other
settings, one worker, or the worker's own measures starts its own with `start_daemon`.
Waits are on readiness signals or on the socket itself.
"""

from __future__ import annotations

import select
import socket
import struct
import time

import psutil
import pytest
from helpers import (
    COLOR_A,
    COLOR_Q,
    NAME_A,
    NAME_Q,
    NOT_ASCII,
    QUEST_A,
    QUEST_Q,
    TOO_LONG,
    ask_on,
    recv_all,
    recv_until,
    scaled,
    server_rx_queue,
)

UNKNOWN_A = b"I don't know that."

# A small question limit so "too long" is cheap to provoke; everything else default.
SMALL_LIMIT = 32
CONFIG = f"""
[protocol]
max_question_bytes = {SMALL_LIMIT}
idle_timeout = 30
"""


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes (fails on EOF before that)."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(1 << 20, size - len(data)))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {size} bytes: {bytes(data[-200:])!r}")
        data += chunk
    return bytes(data)


def read_to_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until a clean EOF.

    A reset (ConnectionResetError) or a hang (TimeoutError) propagates and
    fails the test: the spec wants the error line and then an orderly close.
    """
    sock.settimeout(scaled(timeout))
    return recv_all(sock)


def assert_open(sock: socket.socket) -> None:
    """The connection still works: a known question gets its answer."""
    assert ask_on(sock, NAME_Q) == NAME_A


@pytest.fixture(scope="module")
def daemon(start_shared_daemon):
    return start_shared_daemon(config=CONFIG, workers=2)


# --- the table ---------------------------------------------------------------

def test_builtin_answers_each_on_its_own_connection(daemon):
    assert daemon.ask(NAME_Q) == NAME_A
    assert daemon.ask(QUEST_Q) == QUEST_A
    assert daemon.ask(COLOR_Q) == COLOR_A


def test_builtin_answers_on_one_connection_nothing_extra(daemon):
    with daemon.connect() as sock:
        for question, answer in [(NAME_Q, NAME_A), (QUEST_Q, QUEST_A), (COLOR_Q, COLOR_A)] * 3:
            sock.sendall(question)
            # exactly the answer, no separator, no trailing bytes
            assert recv_exact(sock, len(answer)) == answer
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""


def test_unknown_question_gets_unknown_answer_and_connection_stays_open(daemon):
    with daemon.connect() as sock:
        assert ask_on(sock, b"What is the capital of Assyria?") == UNKNOWN_A
        assert ask_on(sock, b"?") == UNKNOWN_A
        assert ask_on(sock, b"what is your name?") == UNKNOWN_A  # case matters
        assert_open(sock)
        assert ask_on(sock, QUEST_Q) == QUEST_A


# --- framing -------------------------------------------------------------------

def test_white_space_and_crlf_around_questions_is_ignored(daemon):
    with daemon.connect() as sock:
        for raw, answer in [
            (b"What is your name?\r\n", NAME_A),
            (b"\r\n  What is your quest?\r\n", QUEST_A),
            (b"\t \x0b\x0cWhat is your favorite color?   \n\n", COLOR_A),
            (b"\r\n\r\n", None),  # only white space: no question, no answer
            (b"   What is your name?", NAME_A),
        ]:
            sock.sendall(raw)
            if answer is not None:
                assert recv_exact(sock, len(answer)) == answer
        # A sentinel: any stray output for the white space would show up here.
        assert ask_on(sock, QUEST_Q) == QUEST_A
        # All of it in one send.
        sock.sendall(b"What is your name?\r\n\r\nWhat is your quest?\r\n  What is your favorite color?\r\n")
        expected = NAME_A + QUEST_A + COLOR_A
        assert recv_exact(sock, len(expected)) == expected
        assert_open(sock)


def test_pipelined_questions_are_answered_in_order(daemon):
    pairs = [(NAME_Q, NAME_A), (QUEST_Q, QUEST_A), (COLOR_Q, COLOR_A), (b"Who are you?", UNKNOWN_A)]
    sequence = [pairs[(i * 7) % len(pairs)] for i in range(400)]
    stream = b"".join(q + (b"\r\n" if i % 3 == 0 else b"") for i, (q, _) in enumerate(sequence))
    expected = b"".join(a for _, a in sequence)
    with daemon.connect() as sock:
        sock.sendall(stream)
        assert recv_exact(sock, len(expected)) == expected
        assert_open(sock)


def test_question_split_over_several_sends(daemon):
    with daemon.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (b"Wh", b"at is yo", b"ur na", b"me", b"?"):
            sock.sendall(piece)
            time.sleep(0.03)  # separate segments, separate reads on the server
        assert recv_until(sock, b".") == NAME_A
        # Two questions whose boundary falls inside a send.
        sock.sendall(b"What is your quest?What is")
        assert recv_exact(sock, len(QUEST_A)) == QUEST_A
        time.sleep(0.03)
        sock.sendall(b" your favorite color?")
        assert recv_exact(sock, len(COLOR_A)) == COLOR_A
        # One byte at a time.
        for byte in QUEST_Q:
            sock.sendall(bytes([byte]))
            time.sleep(0.002)
        assert recv_exact(sock, len(QUEST_A)) == QUEST_A
        assert_open(sock)


# --- errors ----------------------------------------------------------------------

def test_question_at_the_limit_is_answered(daemon):
    at_limit = b"W" * (SMALL_LIMIT - 1) + b"?"  # SMALL_LIMIT bytes, '?' included
    with daemon.connect() as sock:
        assert ask_on(sock, at_limit) == UNKNOWN_A
        assert ask_on(sock, b"\r\n" + at_limit + b"\r\n") == UNKNOWN_A  # white space does not count
        assert_open(sock)


def test_too_long_question_gets_error_then_eof(daemon):
    with daemon.connect() as sock:
        sock.sendall(b"A" * (SMALL_LIMIT * 3))
        assert read_to_eof(sock) == TOO_LONG


def test_too_long_after_complete_questions_answers_them_first(daemon):
    with daemon.connect() as sock:
        sock.sendall(NAME_Q + QUEST_Q + b"B" * (SMALL_LIMIT * 2))
        assert read_to_eof(sock) == NAME_A + QUEST_A + TOO_LONG


def test_too_long_question_grown_over_several_sends(daemon):
    with daemon.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(COLOR_Q + b"C" * (SMALL_LIMIT // 2))
        assert recv_exact(sock, len(COLOR_A)) == COLOR_A
        sock.sendall(b"C" * (SMALL_LIMIT // 2))
        time.sleep(0.03)
        sock.sendall(b"C" * SMALL_LIMIT)
        assert read_to_eof(sock) == TOO_LONG


def test_too_long_followed_by_much_more_data_is_a_clean_eof_not_a_reset(daemon):
    """The client is still sending when the server gives up: the error must arrive, then EOF."""
    with daemon.connect() as sock:
        payload = NAME_Q + b"D" * (SMALL_LIMIT * 2) + NAME_Q * 20000  # ~400 kB after the error
        sock.sendall(payload)
        assert read_to_eof(sock) == NAME_A + TOO_LONG


def test_non_ascii_byte_gets_error_then_eof(daemon):
    with daemon.connect() as sock:
        sock.sendall("Qu'est-ce que c'est, la qu\u00eate?".encode())
        assert read_to_eof(sock) == NOT_ASCII


def test_non_ascii_after_complete_questions_answers_them_first(daemon):
    with daemon.connect() as sock:
        sock.sendall(NAME_Q + b"\r\n" + COLOR_Q + b"What is \xff?" + QUEST_Q)
        # QUEST_Q comes after the bad question: never answered
        assert read_to_eof(sock) == NAME_A + COLOR_A + NOT_ASCII


def test_non_ascii_in_a_later_send_then_more_data_is_a_clean_eof(daemon):
    with daemon.connect() as sock:
        assert ask_on(sock, QUEST_Q) == QUEST_A
        sock.sendall(b"What is \x80" + b"x" * 300_000)
        assert read_to_eof(sock) == NOT_ASCII


def test_errors_do_not_disturb_other_clients_or_processes(start_daemon):
    daemon = start_daemon(config=CONFIG, workers=1)
    master = psutil.Process(daemon.proc.pid)
    worker_pids = {w.pid for w in daemon.workers()}
    with daemon.connect() as bystander:
        assert ask_on(bystander, NAME_Q) == NAME_A
        bystander.sendall(b"What is your")  # a question in progress across the mayhem
        for bad in (b"x" * (SMALL_LIMIT + 1), b"\xc3\xa9?", NAME_Q + b"\x00\xff" * 100):
            with daemon.connect() as sock:
                sock.sendall(bad)
                output = read_to_eof(sock)
                assert output.endswith((TOO_LONG, NOT_ASCII)), output
        # a client that resets its connection in the middle of a question
        rude = daemon.connect()
        rude.sendall(b"What is your fav")
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rude.close()
        bystander.sendall(b" quest?")
        assert recv_exact(bystander, len(QUEST_A)) == QUEST_A
        assert_open(bystander)
    assert daemon.ask(COLOR_Q) == COLOR_A
    assert {w.pid for w in daemon.workers()} == worker_pids
    assert master.is_running() and daemon.proc.poll() is None
    assert "Traceback" not in daemon.log() and "crashed" not in daemon.log()


# --- idle timeout ------------------------------------------------------------------

def test_idle_timeout_closes_silent_connections_but_not_busy_ones(start_daemon):
    """The timer is scaled(0.5 s): `busy` asks every 0.2 s, which a slow machine (the time factor)
    must not stretch to an idle_timeout, and the silent ones are closed within it."""
    idle_timeout = scaled(0.5)
    daemon = start_daemon(config=f"[protocol]\nidle_timeout = {idle_timeout}\n", workers=2)
    fresh = daemon.connect()  # never says anything
    answered = daemon.connect()  # asks once, then goes quiet
    partial = daemon.connect()  # slowloris: half a question, then nothing
    busy = daemon.connect()  # keeps asking
    try:
        assert ask_on(answered, QUEST_Q) == QUEST_A
        partial.sendall(b"What is your")
        started = time.monotonic()
        closed_after: dict[str, float] = {}
        silent = {"fresh": fresh, "answered": answered, "partial": partial}
        # Keep `busy` asking every 0.2 s until every silent one is closed, and
        # then for a few more idle_timeouts: it must never be closed.
        while time.monotonic() - started < scaled(10):
            assert ask_on(busy, NAME_Q) == NAME_A
            waiting = [s for n, s in silent.items() if n not in closed_after]
            readable, _, _ = select.select(waiting, [], [], 0.2)  # unscaled: busy's pace
            for name, sock in silent.items():
                if sock in readable:
                    sock.settimeout(scaled(1))
                    assert sock.recv(100) == b"", f"{name}: unexpected data"  # clean EOF
                    closed_after[name] = time.monotonic() - started
            enough = 3 * idle_timeout + scaled(1.2)
            if len(closed_after) == len(silent) and time.monotonic() - started > enough:
                break
        assert set(closed_after) == set(silent), f"not closed by the idle timeout: {closed_after}"
        for name, after in closed_after.items():
            assert idle_timeout * 0.9 <= after <= idle_timeout + scaled(2.5), (name, after)
        assert_open(busy)
    finally:
        for sock in (fresh, answered, partial, busy):
            sock.close()


# --- half-close ------------------------------------------------------------------------

def test_half_close_after_pipelined_questions_gets_every_answer_then_eof(daemon):
    questions = [NAME_Q, QUEST_Q, COLOR_Q, b"Why?"] * 250
    expected = b"".join({NAME_Q: NAME_A, QUEST_Q: QUEST_A, COLOR_Q: COLOR_A}.get(q, UNKNOWN_A)
                        for q in questions)
    with daemon.connect() as sock:
        sock.sendall(b"\r\n".join(questions) + b"\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == expected


def test_half_close_like_nc_one_question(daemon):
    with daemon.connect() as sock:
        sock.sendall(COLOR_Q + b"\n")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == COLOR_A


# --- back-pressure -----------------------------------------------------------------------

def test_client_that_does_not_read_is_slowed_down_and_others_do_not_notice(start_daemon):
    daemon = start_daemon(workers=1)  # one worker: the hog and the others share it
    worker = daemon.workers()[0]
    rss_before = worker.memory_info().rss
    cap = 48 << 20  # far more than socket buffers hold when the server stops reading
    stream = NAME_Q * (cap // len(NAME_Q))
    view = memoryview(stream)
    with socket.socket() as hog:
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # before connect
        hog.connect(("127.0.0.1", daemon.port))
        hog.settimeout(scaled(1.0))  # no progress for this long: the server has stopped reading
        sent = 0
        stalled = False
        while sent < len(stream):
            try:
                sent += hog.send(view[sent:sent + (1 << 20)])
            except TimeoutError:
                stalled = True
                break
        assert stalled, f"the server read all {sent} bytes of a client that never reads its answers"
        assert sent < cap
        # The server's side of the hog's connection holds unread bytes: it stopped reading.
        queued = server_rx_queue(hog)
        assert queued is not None and queued > 0, queued
        # Its answers are not buffered without bound in the worker.
        grown = worker.memory_info().rss - rss_before
        assert grown < 32 << 20, f"worker RSS grew by {grown} bytes"
        # Meanwhile, other clients on the same worker are answered at once.
        for _ in range(5):
            t0 = time.monotonic()
            assert daemon.ask(COLOR_Q) == COLOR_A
            assert time.monotonic() - t0 < scaled(0.2)
        # When it reads, it gets every answer, in order, then EOF.
        hog.shutdown(socket.SHUT_WR)  # the tail of a question is never answered
        hog.settimeout(scaled(10))
        expected_count = sent // len(NAME_Q)
        received = bytearray()
        while chunk := hog.recv(1 << 20):
            received += chunk
        assert len(received) == expected_count * len(NAME_A)
        assert received == NAME_A * expected_count
    assert daemon.workers()[0].pid == worker.pid


# --- configuration ------------------------------------------------------------------------

def test_config_answers_replace_builtins_and_custom_unknown_answer(start_daemon):
    daemon = start_daemon(workers=2, config="""
[protocol]
unknown_answer = "Ni."

[answers]
"What is the air-speed velocity of an unladen swallow?" = "What do you mean, an African or European swallow."
"What is your name?" = "It is Arthur, King of the Britons."
"  How many?  " = "Three, sir."
""")
    with daemon.connect() as sock:
        assert ask_on(sock, b"What is the air-speed velocity of an unladen swallow?") == \
            b"What do you mean, an African or European swallow."
        assert ask_on(sock, NAME_Q) == b"It is Arthur, King of the Britons."
        # the built-ins are replaced, not merged
        assert ask_on(sock, QUEST_Q) == b"Ni."
        assert ask_on(sock, COLOR_Q) == b"Ni."
        assert ask_on(sock, b"Who goes there?") == b"Ni."
        assert ask_on(sock, b"\r\nHow many?\r\n") == b"Three, sir."
        sock.sendall(b"How many?Who?What is your name?")
        expected = b"Three, sir.Ni.It is Arthur, King of the Britons."
        assert recv_exact(sock, len(expected)) == expected


def test_daemon_keeps_running_after_error_storm(daemon):
    """Many bad connections in a row: no worker dies, every new client is served."""
    worker_pids = {w.pid for w in daemon.workers()}
    for i in range(50):
        with daemon.connect() as sock:
            sock.sendall(b"\xfe" if i % 2 else b"z" * (SMALL_LIMIT + 5))
            assert read_to_eof(sock) in (NOT_ASCII, TOO_LONG)
    assert daemon.ask(NAME_Q) == NAME_A
    assert {w.pid for w in daemon.workers()} == worker_pids
