"""docs/PROMISES.md §3-§4 and README "Monitoring" with real daemons: `lancelotd status`, its --json
schema and LSB exit codes, the scoreboard's counters, synchronous `reload` and `stop`,
and the Prometheus metrics the master serves.

Every daemon is a real `lancelotd serve` (the `start_daemon` fixture kills and reaps the
whole process group at teardown); the tests talk real TCP and send real signals.  Workers
publish their counters once per tick (about a second), so counters are awaited on the
scoreboard (or the metrics endpoint) with `wait_for`, then checked exactly through the
command an operator runs.  No fixed sleeps: waits are on the scoreboard, log lines,
psutil, or the output of the command itself.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
from helpers import (
    NAME_A,
    NAME_Q,
    NOT_ASCII,
    NOT_RUNNING_KEYS,
    PROXY,
    QUEST_A,
    QUEST_Q,
    REPO,
    RUNNING_SCHEMA,
    TOO_LONG,
    ZERO_PROXY_COUNTERS,
    ZERO_REFUSED,
    Backlog,
    Daemon,
    assert_running_schema,
    dead_pid,
    gone,
    holder_of,
    lancelotd_cli,
    metrics_url,
    recv_all,
    recv_until,
    scaled,
    schema_problems,
    scrape,
    status_config,
    status_json,
    value,
    wait_child_exit,
    wait_equal,
    wait_for,
    wait_metrics,
)

from lancelotd.scoreboard import STATE_NAMES, Scoreboard

COLOR_Q = b"Color?"
UNKNOWN_A = b"No idea."
ZERO_ERRORS = {"unknown": 0, "too_long": 0, "not_ascii": 0, "timeouts": 0}


# --- the scoreboard, read directly to know when the workers have published ------------

def board_of(d: Daemon) -> closing[Scoreboard]:
    return closing(Scoreboard.open(str(d.pid_file) + ".scoreboard"))


def slots_of(board: Scoreboard) -> dict[int, tuple[int, str]]:
    """pid -> (generation, state) of every worker in the scoreboard."""
    return {slot.pid: (slot.generation, STATE_NAMES[slot.state]) for _, slot in board.slots() if slot.pid}


def wait_serving(board: Scoreboard, count: int, generation: int = 1) -> dict[int, tuple[int, str]]:
    def pool() -> dict[int, tuple[int, str]] | None:
        slots = slots_of(board)
        ok = len(slots) == count and all(v == (generation, "serving") for v in slots.values())
        return slots if ok else None
    return wait_for(pool, 10, f"{count} workers of generation {generation} serving")  # type: ignore[return-value]


# --- talking ----------------------------------------------------------------------------

def read_answers(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    """`count` answers (each up to and including its '.'), each within scaled(`timeout`)."""
    sock.settimeout(scaled(timeout))
    data = b""
    while data.count(b".") < count:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"EOF after {data.count(b'.')} of {count} answers")
        data += chunk
    answers = [part + b"." for part in data.split(b".")[:-1]]
    assert len(answers) == count and data.endswith(b"."), f"more than {count} answers: {data[-200:]!r}"
    return answers


# --- the --json schema, as the README documents it ----------------------------------------


def test_schema_checker_catches_mistakes():
    """The checker the tests rely on is not vacuous."""
    worker = {"pid": 2, "number": 1, "generation": 1, "state": "serving", "uptime_s": 1.0,
              "heartbeat_age_s": 0.1, "connections": 0, "answered": 0, "answered_per_s": 0.0, "accepted": 0,
              "errors": dict(ZERO_ERRORS), "refused": dict(ZERO_REFUSED), "proxy": dict.fromkeys(PROXY, 0),
              "bytes_in": 0, "bytes_out": 0, "recent_clients": ["198.18.0.2:31222"], "cpu_seconds": 0.0,
              "cpu_percent": 0.0, "rss": 1, "uss": 1}
    good = {"schema": 1, "state": "running", "time": 1.0,
            "master": {"pid": 1, "generation": 1, "workers_target": 1, "uptime_s": 1.0, "title": "t",
                       "cpu_seconds": 0.1, "cpu_percent": 0.0, "rss": 1, "uss": 1},
            "listeners": [{"address": "127.0.0.1:1", "role": "service", "accept_queue": 0}],
            "balancer": {"state": "ready", "drained": False, "agent": "ready 100%"},
            "reloads": {"count": 0, "failures": 0, "last": None, "last_ok": True, "last_message": "",
                        "pending": False},
            "replaced": {"crashed": 0, "hung": 0, "recycled": 0},
            "workers": [worker],
            "totals": {"connections": 0, "answered": 0, "answered_per_s": 0.0, "accepted": 0,
                       "errors": dict(ZERO_ERRORS), "refused": dict(ZERO_REFUSED),
                       "proxy": dict.fromkeys(PROXY, 0), "bytes_in": 0, "bytes_out": 0}}
    assert schema_problems(good, RUNNING_SCHEMA) == []
    broken = json.loads(json.dumps(good))
    del broken["workers"][0]["uss"]
    broken["listeners"][0]["accept_queue"] = "0"
    broken["reloads"]["pending"] = 0
    broken["totals"]["answered"] = True
    broken["workers"][0]["state"] = "free"
    broken["schema"] = 1.0
    assert sorted(schema_problems(broken, RUNNING_SCHEMA)) == sorted([
        "$.workers[0].uss: missing",
        "$.listeners[0].accept_queue: int expected, not '0'",
        "$.reloads.pending: bool expected, not 0",
        "$.totals.answered: int expected, not True",
        "$.workers[0].state: one of ('starting', 'serving', 'draining', 'stopping') expected, not 'free'",
        "$.schema: one of (1,) expected, not 1.0",
    ])


# =========================================================================================
# 1. status while running: the table, the JSON schema, the accept queue
# =========================================================================================

TABLE_ROW = re.compile(r"^(master|worker (\d+))\s+(\d+)\s+(\d+)\s+(\S+)\s", re.M)


def test_status_table_and_json_while_running(start_daemon):
    d = start_daemon(config=status_config(workers=2), workers=2)
    master = d.proc.pid
    with board_of(d) as board:
        pool = wait_serving(board, 2)
    assert set(pool) == {p.pid for p in d.workers()}

    # The table: the master and each worker with PID, generation and state.
    result = lancelotd_cli("status", "--pid-file", str(d.pid_file))
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert f"lancelotd running: master {master}," in table, table
    assert f"127.0.0.1:{d.port}" in table, table
    rows = {m.group(1): (int(m.group(3)), int(m.group(4)), m.group(5)) for m in TABLE_ROW.finditer(table)}
    with board_of(d) as board:
        numbers = {slot.pid: slot.number for _, slot in board.slots()}
    expected = {"master": (master, 1, "-")}
    expected.update({f"worker {numbers[pid]}": (pid, 1, "serving") for pid in pool})
    assert rows == expected, table

    # --json, taken while both workers are stopped and 3 clients wait in the accept queue.
    for pid in pool:
        os.kill(pid, signal.SIGSTOP)
    clients: list[socket.socket] = []
    try:
        for pid in pool:  # off the listener's wait queue only once actually stopped
            wait_for(lambda pid=pid: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 5,
                     f"worker {pid} stopped")
        for _ in range(3):
            sock = d.connect()
            clients.append(sock)
            sock.sendall(NAME_Q)
        snap = status_json(d.pid_file)
    finally:
        for pid in pool:
            os.kill(pid, signal.SIGCONT)
    for sock in clients:
        with sock:
            assert recv_until(sock, b".") == NAME_A  # the queued clients are served once resumed

    assert_running_schema(snap)
    assert snap["state"] == "running"
    assert snap["master"]["pid"] == master
    assert snap["master"]["generation"] == 1
    assert snap["master"]["workers_target"] == 2
    assert snap["master"]["title"].startswith("lancelotd: master [")
    assert snap["master"]["rss"] > 0 and snap["master"]["uss"] > 0
    assert len(snap["workers"]) == 2
    assert {w["pid"]: (w["generation"], w["state"]) for w in snap["workers"]} == pool
    assert sorted(w["number"] for w in snap["workers"]) == [1, 2]
    assert all(w["rss"] > 0 and w["uss"] > 0 for w in snap["workers"])
    queues = {entry["address"]: entry["accept_queue"] for entry in snap["listeners"]}
    assert queues.get(f"127.0.0.1:{d.port}") == 3, snap["listeners"]
    assert snap["reloads"] == {"count": 0, "failures": 0, "last": None, "last_ok": True, "last_message": "",
                               "pending": False}
    assert snap["replaced"] == {"crashed": 0, "hung": 0, "recycled": 0}
    assert snap["totals"]["answered"] == 0 and snap["totals"]["errors"] == ZERO_ERRORS


# =========================================================================================
# 2. The counters agree with what was sent
# =========================================================================================

def test_counters_agree_with_what_was_sent(start_daemon):
    d = start_daemon(config=status_config(workers=2), workers=2)
    known = [(NAME_Q, NAME_A), (QUEST_Q, QUEST_A), (COLOR_Q, b"Blue.")]
    unknown = [b"Who goes there?", b"What is the air-speed velocity of an unladen swallow?"]

    def question(i: int) -> tuple[bytes, bytes]:
        if i % 4 == 3:
            return unknown[i % 2], UNKNOWN_A
        return known[i % 3]

    sent = answered = unknowns = bytes_in = bytes_out = 0
    socks = [d.connect() for _ in range(5)]  # all open at once, so both workers may take some
    try:
        # One connection, one question at a time, nc-style line ends on every other one.
        for i in range(100):
            q, a = question(i)
            data = q + (b"\r\n" if i % 2 else b"")
            socks[0].sendall(data)
            assert read_answers(socks[0], 1) == [a]
            sent, answered, unknowns = sent + 1, answered + 1, unknowns + (a == UNKNOWN_A)
            bytes_in, bytes_out = bytes_in + len(data), bytes_out + len(a)
        # Four connections, 225 questions each, pipelined in bursts of 75.
        for sock in socks[1:]:
            for burst in range(3):
                qs = [question(burst * 75 + i) for i in range(75)]
                data = b" ".join(q for q, _ in qs)
                sock.sendall(data)
                assert read_answers(sock, 75) == [a for _, a in qs]
                sent, answered = sent + 75, answered + 75
                unknowns += sum(a == UNKNOWN_A for _, a in qs)
                bytes_in, bytes_out = bytes_in + len(data), bytes_out + sum(len(a) for _, a in qs)
    finally:
        for sock in socks:
            sock.close()
    assert (sent, answered) == (1000, 1000)
    assert 200 < unknowns < 300

    expected = {"accepted": 5, "answered": 1000, "unknown": unknowns, "too_long": 0, "not_ascii": 0,
                "timeouts": 0, "bytes_in": bytes_in, "bytes_out": bytes_out, **ZERO_REFUSED,
                **ZERO_PROXY_COUNTERS}
    with board_of(d) as board:
        wait_equal(lambda: asdict(board.totals()), expected, 10, "the workers' counters published")

    snap = status_json(d.pid_file)
    totals = snap["totals"]
    assert totals["answered"] == 1000
    assert totals["errors"] == {"unknown": unknowns, "too_long": 0, "not_ascii": 0, "timeouts": 0}
    assert (totals["accepted"], totals["bytes_in"], totals["bytes_out"]) == (5, bytes_in, bytes_out)
    # The totals are the sum of the workers (none has exited).
    assert sum(w["answered"] for w in snap["workers"]) == 1000
    assert sum(w["errors"]["unknown"] for w in snap["workers"]) == unknowns
    assert sum(w["accepted"] for w in snap["workers"]) == 5
    assert totals["connections"] == 0


def test_error_counters_by_kind(start_daemon):
    # idle_timeout scaled(0.5): no connection is closed as idle before its question, on a slow machine too.
    d = start_daemon(config=status_config(workers=1, protocol=f"idle_timeout = {scaled(0.5)}"), workers=1)
    # Too long: one known question answered, then 100 bytes without '?' (the limit is 64).
    with d.connect() as sock:
        sock.sendall(QUEST_Q + b"x" * 100)
        assert recv_all(sock) == QUEST_A + TOO_LONG
    # Not ASCII, after a known and an unknown question in the same segment.
    with d.connect() as sock:
        sock.sendall(NAME_Q + b"Who?" + "Caf\u00e9?".encode())
        assert recv_all(sock) == NAME_A + UNKNOWN_A + NOT_ASCII
    # Idle: one question, then silence until the server closes (idle_timeout scaled(0.5) s).
    with d.connect(timeout=10) as sock:
        sock.sendall(NAME_Q)
        assert recv_until(sock, b".") == NAME_A
        started = time.monotonic()
        assert recv_all(sock) == b""
        assert time.monotonic() - started < scaled(5)

    expected = {"accepted": 3, "answered": 4, "unknown": 1, "too_long": 1, "not_ascii": 1, "timeouts": 1}
    with board_of(d) as board:
        wait_equal(lambda: {k: v for k, v in asdict(board.totals()).items() if k in expected}, expected, 10,
                   "the error counters published")
    totals = status_json(d.pid_file)["totals"]
    assert totals["errors"] == {"unknown": 1, "too_long": 1, "not_ascii": 1, "timeouts": 1}
    assert totals["answered"] == 4  # error lines are not answers
    assert totals["accepted"] == 3


# =========================================================================================
# 3. A reload: two generations side by side, then one; totals survive the old workers
# =========================================================================================

def test_reload_shows_both_generations(start_daemon):
    d = start_daemon(config=status_config(workers=2), workers=2)
    with board_of(d) as board:
        gen1 = wait_serving(board, 2)
        with d.connect() as holder:
            holder.sendall(NAME_Q)
            assert recv_until(holder, b".") == NAME_A
            old = holder_of(holder, list(gen1))
            assert old is not None
            # The old worker owes this client answers it cannot send: it can neither leave nor hand it over.
            backlog = Backlog(holder).fill()
            questions = -(-backlog.sent // len(NAME_Q))

            d.config_file.write_text(status_config(workers=2, color="Green."))
            d.signal(signal.SIGHUP)

            def two_generations() -> bool:
                slots = slots_of(board)
                gen2 = [v for v in slots.values() if v[0] == 2]
                return slots.get(old) == (1, "draining") and len(slots) == 3 and gen2 == [(2, "serving")] * 2
            wait_for(two_generations, 10, "the old worker draining and 2 new ones serving")

            snap = status_json(d.pid_file)
            assert_running_schema(snap)
            by_gen: dict[int, list[tuple[int, str]]] = {}
            for w in snap["workers"]:
                by_gen.setdefault(w["generation"], []).append((w["pid"], w["state"]))
            assert by_gen[1] == [(old, "draining")], snap["workers"]
            assert [state for _, state in by_gen[2]] == ["serving", "serving"], snap["workers"]
            assert set(by_gen) == {1, 2}
            assert snap["master"]["generation"] == 2
            assert snap["reloads"]["count"] == 1 and snap["reloads"]["last_ok"] is True
            assert snap["reloads"]["failures"] == 0 and isinstance(snap["reloads"]["last"], float)
            draining = next(w for w in snap["workers"] if w["pid"] == old)
            assert draining["connections"] == 1

            backlog.settle()
            holder.sendall(NAME_Q)
            assert recv_until(holder, b".") == NAME_A
        wait_for(lambda: gone(old), 10, "the old worker to leave once its client is answered")
        expected = questions + 2
        wait_equal(lambda: (set(slots_of(board).values()), board.totals().answered),
                   ({(2, "serving")}, expected), 10, "generation 2 alone, the old worker's answers kept")
    snap = status_json(d.pid_file)
    assert [w["generation"] for w in snap["workers"]] == [2, 2]
    assert snap["totals"]["answered"] == expected
    assert snap["totals"]["bytes_in"] == expected * len(NAME_Q)
    assert snap["replaced"] == {"crashed": 0, "hung": 0, "recycled": 0}


# =========================================================================================
# 4. A crashed worker: replaced, counted, its answers kept
# =========================================================================================

def test_crashed_worker_keeps_totals(start_daemon):
    d = start_daemon(config=status_config(workers=2), workers=2)
    with board_of(d) as board:
        pool = wait_serving(board, 2)
        with d.connect() as sock:
            for _ in range(50):
                sock.sendall(NAME_Q)
                assert recv_until(sock, b".") == NAME_A
            victim = holder_of(sock, list(pool))
        assert victim is not None
        wait_equal(lambda: next((s.counters.answered for _, s in board.slots() if s.pid == victim), None),
                   50, 10, "the victim's counters published")
        before = status_json(d.pid_file)
        assert before["totals"]["answered"] == 50

        os.kill(victim, signal.SIGKILL)
        wait_equal(lambda: (board.read_header().replaced_crashed, len(slots_of(board)),
                            victim in slots_of(board)),
                   (1, 2, False), 10, "the crashed worker replaced")
        wait_serving(board, 2)
    after = status_json(d.pid_file)
    assert after["replaced"] == {"crashed": 1, "hung": 0, "recycled": 0}
    assert after["totals"]["answered"] == 50  # not down: the dead worker's last published counters are kept
    assert after["totals"]["accepted"] == 1
    assert victim not in {w["pid"] for w in after["workers"]}
    assert len(after["workers"]) == 2


# =========================================================================================
# 5. Not running: LSB exit codes 1, 3, 4 and the JSON states
# =========================================================================================

@pytest.mark.parametrize("case, code, state, words", [
    ("pid-not-running", 1, "dead", ("stale", "not running")),
    ("pid-of-another-process", 1, "dead", ("stale", "not lancelotd")),
    ("no-pid-file", 3, "stopped", ("not running", "no PID file")),
    ("garbage", 4, "unknown", ("does not hold a PID",)),
    ("empty", 4, "unknown", ("does not hold a PID",)),
    ("binary", 4, "unknown", ("does not hold a PID",)),
    ("unreadable-directory", 4, "unknown", ("lancelotd.pid",)),
])
def test_status_when_not_running(tmp_path, case, code, state, words):
    pid_file = tmp_path / "lancelotd.pid"
    content = {"pid-not-running": f"{dead_pid()}\n", "pid-of-another-process": f"{os.getpid()}\n",
               "garbage": "hello\n", "empty": "", "binary": b"\xff\xfe12\n"}
    if case == "unreadable-directory":
        pid_file.mkdir()  # open() fails even for root (a mode-000 file would not)
    elif case in content:
        data = content[case]
        pid_file.write_bytes(data if isinstance(data, bytes) else data.encode())

    result = lancelotd_cli("status", "--pid-file", str(pid_file))
    assert result.returncode == code, f"exit {result.returncode}, not {code}: {result.stdout}{result.stderr}"
    message = result.stdout + result.stderr
    assert "Traceback" not in message, message
    for word in words:
        assert word in message, message

    result = lancelotd_cli("status", "--pid-file", str(pid_file), "--json")
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    snap = json.loads(result.stdout)
    assert snap["state"] == state
    assert isinstance(snap["problem"], str) and all(word in snap["problem"] for word in words), snap
    assert snap["schema"] == 1
    assert set(snap) <= NOT_RUNNING_KEYS, f"a {state} status holds fields of a running one: {snap}"


def test_status_after_the_master_was_killed(start_daemon, tmp_path):
    d = start_daemon(config=status_config(workers=1), workers=1)
    # A PID file naming the live master, with no scoreboard beside it: unknown (4).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(d.pid_file, elsewhere / "lancelotd.pid")
    result = lancelotd_cli("status", "--pid-file", str(elsewhere / "lancelotd.pid"), "--json")
    assert result.returncode == 4, result.stdout + result.stderr
    snap = json.loads(result.stdout)
    assert snap["state"] == "unknown" and "scoreboard" in snap["problem"], snap

    # The master SIGKILLed: its PID file stays behind, stale (1).
    master = d.proc.pid
    os.killpg(master, signal.SIGKILL)
    d.wait_exit(10)
    assert d.pid_file.exists()
    result = lancelotd_cli("status", "--pid-file", str(d.pid_file))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stale" in result.stderr and str(master) in result.stderr, result.stderr
    result = lancelotd_cli("status", "--pid-file", str(d.pid_file), "--json")
    assert result.returncode == 1
    snap = json.loads(result.stdout)
    assert snap["state"] == "dead" and str(master) in snap["problem"], snap


# =========================================================================================
# 6. Synchronous reload and stop
# =========================================================================================

def test_reload_command_returns_once_the_new_generation_serves(start_daemon):
    d = start_daemon(config=status_config(workers=2, color="Blue."), workers=2)
    assert d.ask(COLOR_Q) == b"Blue."
    for generation, color in ((2, "Green."), (3, "Red.")):
        d.config_file.write_text(status_config(workers=2, color=color))
        result = lancelotd_cli("reload", "--pid-file", str(d.pid_file))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"generation {generation} serving" in result.stdout, result.stdout
        # Right away, with no waiting: every new connection gets the new answer.
        answers = [d.ask(COLOR_Q) for _ in range(20)]
        assert answers == [color.encode()] * 20, f"after `reload` returned (gen {generation}): {answers}"

    # An invalid file: 1, the error names the key, and the server keeps serving as it was.
    d.config_file.write_text(status_config(workers=2, color="Purple.").replace("max_question_bytes = 64",
                                                                         'max_question_bytes = "big"'))
    result = lancelotd_cli("reload", "--pid-file", str(d.pid_file))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "protocol.max_question_bytes" in result.stderr, result.stderr
    assert d.ask(COLOR_Q) == b"Red."
    with board_of(d) as board:
        header = board.read_header()
        assert (header.generation, header.reloads, header.reload_failures) == (3, 3, 1)
        assert {g for g, _ in slots_of(board).values()} == {3}
    assert d.proc.poll() is None


def test_stop_command_returns_once_the_master_is_gone(start_daemon):
    d = start_daemon(config=status_config(workers=1), workers=1)
    master = d.proc.pid
    (worker,) = [p.pid for p in d.workers()]
    reaper = threading.Thread(target=d.proc.wait, daemon=True)  # we are the master's parent
    reaper.start()
    holder = d.connect()
    holder.sendall(NAME_Q)
    assert recv_until(holder, b".") == NAME_A
    Backlog(holder).fill()  # the worker owes answers: a graceful stop has to wait for this client

    stop = subprocess.Popen([sys.executable, "-m", "lancelotd", "stop", "--pid-file", str(d.pid_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for(lambda: "graceful stop: signalling" in d.log(), 10, "the master to begin a graceful stop")
        returned = stop.poll()
        assert returned is None or gone(master), f"stop returned {returned} while master {master} runs"
        assert not gone(master), "the master left without answering the client"
        # Read everything owed until the server closes; then the worker, then the master, leave.
        holder.setblocking(True)
        holder.settimeout(scaled(15))
        data = recv_all(holder)
        assert data and data == NAME_A * (len(data) // len(NAME_A)), data[-100:]
        out, err = stop.communicate(timeout=scaled(20))
    finally:
        holder.close()
        if stop.poll() is None:
            stop.kill()
            stop.communicate()
    assert stop.returncode == 0, out + err
    assert gone(master), f"`stop` returned while master {master} is still running"
    assert gone(worker)
    assert f"stopped master {master}" in out
    reaper.join(scaled(10))
    assert d.proc.returncode == 0
    assert not d.pid_file.exists()
    assert lancelotd_cli("status", "--pid-file", str(d.pid_file)).returncode == 3


# =========================================================================================
# 7. Prometheus metrics from the master
# =========================================================================================


ANSWERED = ("lancelotd_questions_answered_total", ())


def test_metrics(start_daemon):
    d = start_daemon(config=status_config(workers=2, server='metrics_bind = "127.0.0.1:0"'), workers=2)
    master = d.proc.pid
    url = metrics_url(d, master)
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=scaled(5))
    assert error.value.code == 404
    # `status` tells the metrics listener from the service's
    expected = {f"127.0.0.1:{d.port}": "service", url.split("/")[2]: "metrics"}

    def roles() -> dict[str, str]:
        return {entry["address"]: entry["role"] for entry in status_json(d.pid_file)["listeners"]}
    wait_for(lambda: roles() == expected, 5, f"the listeners in status to be {expected}")

    with board_of(d) as board:
        pool = wait_serving(board, 2)
    with d.connect() as sock:  # 30 known and 10 unknown questions, pipelined
        sock.sendall((NAME_Q + QUEST_Q + COLOR_Q + b"Who?") * 10)
        read_answers(sock, 40)
    with d.connect() as sock:
        sock.sendall(b"y" * 100)
        assert recv_all(sock) == TOO_LONG
    with d.connect() as sock:
        sock.sendall(b"\xe9?")
        assert recv_all(sock) == NOT_ASCII
    samples = wait_metrics(url, {
        ANSWERED: 40,
        ("lancelotd_errors_total", (("kind", "unknown"),)): 10,
        ("lancelotd_errors_total", (("kind", "too_long"),)): 1,
        ("lancelotd_errors_total", (("kind", "not_ascii"),)): 1,
        ("lancelotd_errors_total", (("kind", "timeouts"),)): 0,
        ("lancelotd_connections_accepted_total", ()): 3,
        ("lancelotd_workers", (("state", "serving"),)): 2,
        ("lancelotd_reloads_total", (("result", "ok"),)): 0,
    })
    # Per worker: each one's series, summing to the total; memory of every process.
    with board_of(d) as board:
        numbers = {slot.pid: slot.number for _, slot in board.slots()}
    # Labelled by worker number and relative generation, never by PID (issue 21: no series churn).
    per_worker = [value(samples, "lancelotd_worker_questions_answered_total", worker=str(numbers[pid]),
                        generation="current") for pid in pool]
    assert None not in per_worker, sorted(k for k in samples if "worker_questions" in k[0])
    assert sum(per_worker) == 40  # type: ignore[arg-type]
    assert not any("pid" in dict(labels) for _, labels in samples), "a pid label"
    for pid in pool:
        assert value(samples, "lancelotd_worker_connections", worker=str(numbers[pid]),
                     generation="current") == 0
    for role, number in [("master", ""), *(("worker", str(numbers[p])) for p in pool)]:
        generation = "current" if number else ""
        for kind in ("rss", "uss"):
            memory = value(samples, "lancelotd_process_memory_bytes", role=role, worker=number,
                           generation=generation, kind=kind)
            assert memory and memory > 0, (role, number, kind)
        opened = value(samples, "lancelotd_process_open_fds", role=role, worker=number, generation=generation)
        limit = value(samples, "lancelotd_process_max_fds", role=role, worker=number, generation=generation)
        assert opened and limit and 0 < opened < limit, (role, number, opened, limit)
    assert value(samples, "lancelotd_max_connections") == 10000
    assert value(samples, "lancelotd_last_reload_ok") == 1 and value(samples, "lancelotd_upgrade_failed") == 0

    # After a reload: counted, and still served.
    d.signal(signal.SIGHUP)
    samples = wait_metrics(url, {
        ("lancelotd_reloads_total", (("result", "ok"),)): 1,
        ("lancelotd_reloads_total", (("result", "failed"),)): 0,
        ("lancelotd_generation", ()): 2,
        ("lancelotd_workers", (("state", "serving"),)): 2,
        ("lancelotd_workers", (("state", "draining"),)): 0,
        ANSWERED: 40,
    })
    with board_of(d) as board:
        pool = wait_serving(board, 2, generation=2)

    # After a crash: counted by reason; the total does not go down.
    victim = next(iter(pool))
    os.kill(victim, signal.SIGKILL)
    wait_metrics(url, {
        ("lancelotd_worker_restarts_total", (("reason", "crashed"),)): 1,
        ("lancelotd_worker_restarts_total", (("reason", "hung"),)): 0,
        ("lancelotd_workers", (("state", "serving"),)): 2,
        ANSWERED: 40,
    })

    # After a USR2 upgrade the new master serves the metrics.
    d.signal(signal.SIGUSR2)

    def new_master() -> int | None:
        try:
            pid = int(d.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if pid != master else None
    new_pid: int = wait_for(new_master, 10, "the new master's PID in the PID file")  # type: ignore[assignment]
    wait_for(lambda: f"upgrade: new master {new_pid} is ready" in d.log(), 10, "the upgrade to complete")
    new_url = metrics_url(d, new_pid)
    assert d.wait_exit(15) == 0  # the old master leaves (no client held it)
    for _ in range(3):
        assert d.ask(NAME_Q) == NAME_A
    samples = wait_metrics(new_url, {("lancelotd_workers", (("state", "serving"),)): 2})
    wait_for(lambda: (value(scrape(new_url), ANSWERED[0]) or 0) >= 3, 10, "the new master's workers counted")
    # One master series, the new master's: the same labels as the old one's (no pid label).
    masters = [labels for name, labels in samples if name == "lancelotd_process_memory_bytes"
               and ("role", "master") in labels and ("kind", "rss") in labels]
    assert len(masters) == 1, masters

    os.kill(new_pid, signal.SIGTERM)
    assert wait_child_exit(new_pid, 15) == 0


# =========================================================================================
# 8. --watch; monit
# =========================================================================================

def test_watch_refreshes(start_daemon):
    d = start_daemon(config=status_config(workers=1), workers=1)
    # SIGINT as a terminal's ^C finds it, whatever this test inherited: a suite started in the
    # background (`pytest &`) has SIGINT ignored, exec keeps that, and Python then installs no
    # KeyboardInterrupt handler, so the ^C below would be ignored (issue 21: the "flaky" failure).
    proc = subprocess.Popen([sys.executable, "-m", "lancelotd", "status", "--pid-file", str(d.pid_file),
                             "--watch", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    clear = b"\x1b[H\x1b[2J"
    out = bytearray()
    arrivals: list[float] = []
    try:
        def frames() -> int:
            while select.select([proc.stdout], [], [], 0)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    break
                out.extend(chunk)
                arrivals.extend([time.monotonic()] * (chunk.count(clear)))
            assert proc.poll() is None, f"--watch exited {proc.returncode}: {bytes(out)!r}"
            return out.count(clear) >= 3
        wait_for(frames, 15, "3 frames of --watch")
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=scaled(10))  # its exit is the signal waited for
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err, err
    text = (bytes(out) + rest).decode()
    shown = [frame for frame in text.split(clear.decode())[1:] if frame.strip()]
    assert len(shown) >= 3
    assert all(f"lancelotd running: master {d.proc.pid}," in frame and "worker 1" in frame for frame in shown)
    gaps = [b - a for a, b in zip(arrivals[1:], arrivals[2:], strict=False)]
    assert gaps and min(gaps) < scaled(2.0), f"frames {gaps} s apart with --watch 0.3"


def test_monit_stanza_is_valid(tmp_path):
    monit = shutil.which("monit")
    if monit is None:
        pytest.skip("monit is not installed")
    # monit insists that a checked program exists: point it at this venv's lancelotd.
    stanza = (REPO / "etc" / "monit" / "lancelotd").read_text()
    assert "/usr/bin/lancelotd" in stanza
    installed = Path(sys.executable).parent / "lancelotd"
    (tmp_path / "lancelotd.monit").write_text(stanza.replace("/usr/bin/lancelotd", str(installed)))
    control = tmp_path / "monitrc"
    control.write_text(f"set daemon 30\ninclude {tmp_path / 'lancelotd.monit'}\n")
    control.chmod(0o600)
    result = subprocess.run([monit, "-t", "-c", str(control)], capture_output=True, text=True,
                            timeout=scaled(30))
    assert result.returncode == 0, result.stdout + result.stderr


def test_stop_when_not_running_succeeds(tmp_path):
    """LSB: stopping a stopped service is a success, with a word about it."""
    command = [sys.executable, "-m", "lancelotd", "stop", "--pid-file", str(tmp_path / "none.pid")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=scaled(30))
    assert result.returncode == 0
    assert "not running" in result.stderr
