"""docs/PROMISES.md §1-§4 with real processes: titles, PID file, signals, supervision, CLI.

Every daemon is a real `lancelotd serve` started by the `start_daemon`
fixture (which SIGKILLs and reaps the whole process group at teardown).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from helpers import (
    BIN,
    COLOR_A,
    COLOR_Q,
    LISTENING,
    NAME_A,
    NAME_Q,
    QUEST_A,
    QUEST_Q,
    clean_env,
    dead_pid,
    gone,
    lancelot_cli,
    lancelotd_cli,
    recv_all,
    recv_until,
    scaled,
    title,
    wait_for,
    wait_log,
)

import lancelotd

# --- helpers ----------------------------------------------------------------------

def start_over_pid_file(start_daemon, subdir: str):
    """Start a daemon whose PID file already exists (stale) and wait until it is ready.

    conftest's wait_ready takes "the PID file exists" as readiness, which a
    stale file already satisfies; here we wait for the file to name our master.
    """
    daemon = start_daemon("-w", "1", wait=False, subdir=subdir)

    def ready() -> bool:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"lancelotd exited with {daemon.proc.returncode}:\n{daemon.log()}")
        try:
            return daemon.pid_file.read_text().strip() == str(daemon.proc.pid)
        except FileNotFoundError:
            return False

    wait_for(ready, 10, "the PID file to name the new master")
    match = LISTENING.search(daemon.log())
    assert match, daemon.log()
    daemon.port = int(match.group(2))
    daemon.wait_workers(1)
    return daemon


def named_workers(daemon) -> dict[str, psutil.Process]:
    """The live workers by title."""
    return {title(w): w for w in daemon.workers()}


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=scaled(1)).close()
    except ConnectionRefusedError:
        return True
    return False


# --- process titles and the PID file ----------------------------------------------------

def test_master_and_workers_are_named_in_ps(start_daemon):
    daemon = start_daemon(workers=3, config="[protocol]\nidle_timeout = 30\n")
    master = psutil.Process(daemon.proc.pid)
    assert title(master) == f"lancelotd: master [{daemon.config_file}]"
    expected = [f"lancelotd: worker {n} [gen 1]" for n in (1, 2, 3)]
    # a worker names itself just after the fork: wait for the names, not just the processes
    wait_for(lambda: sorted(named_workers(daemon)) == expected, 5, "three named workers")
    workers = daemon.workers()
    assert all(w.ppid() == master.pid for w in workers)
    assert daemon.ask(NAME_Q) == NAME_A
    # and exactly three: no extra worker shows up once it is serving
    assert len(daemon.workers()) == 3


def test_pid_file_holds_master_pid_while_running_and_is_removed_after_term(start_daemon):
    daemon = start_daemon(workers=2)
    assert daemon.pid_file.read_text().strip() == str(daemon.proc.pid)
    assert daemon.ask(QUEST_Q) == QUEST_A  # its presence means "listening"
    worker_pids = [w.pid for w in daemon.workers()]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(10) == 0
    assert not daemon.pid_file.exists()
    assert all(gone(pid) for pid in worker_pids)
    assert not list(daemon.tmp.glob("*.tmp")), "a temporary PID file was left behind"


def _dead_pid() -> str:
    return f"{dead_pid()}\n"


@pytest.mark.parametrize("content", [_dead_pid, lambda: "garbage\n", lambda: ""],
                         ids=["dead-pid", "garbage", "empty"])
def test_stale_pid_file_does_not_block_a_start(start_daemon, tmp_path, content):
    pid_file = tmp_path / "stale" / "lancelotd.pid"
    pid_file.parent.mkdir()
    pid_file.write_text(content())
    daemon = start_over_pid_file(start_daemon, "stale")
    assert daemon.pid_file == pid_file
    assert pid_file.read_text().strip() == str(daemon.proc.pid)
    assert daemon.ask(NAME_Q) == NAME_A
    if content is _dead_pid:
        assert "stale" in daemon.log()


@pytest.mark.parametrize("who", ["pytest", "sleep"])
def test_pid_file_naming_a_live_process_that_is_not_lancelotd_does_not_block(start_daemon, tmp_path, who):
    sleeper = subprocess.Popen(["sleep", "60"]) if who == "sleep" else None
    try:
        other = sleeper.pid if sleeper else os.getpid()
        pid_file = tmp_path / "reused" / "lancelotd.pid"
        pid_file.parent.mkdir()
        pid_file.write_text(f"{other}\n")
        daemon = start_over_pid_file(start_daemon, "reused")
        assert pid_file.read_text().strip() == str(daemon.proc.pid)
        assert daemon.ask(COLOR_Q) == COLOR_A
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(10) == 0
        # that other process was left alone
        assert psutil.pid_exists(other) and not gone(other)
        if sleeper:
            assert sleeper.poll() is None
    finally:
        if sleeper:
            sleeper.kill()
            sleeper.wait()


def test_second_start_on_the_same_pid_file_fails_and_names_the_pid(start_daemon):
    first = start_daemon(workers=1)
    second = start_daemon("-w", "1", "--pid-file", str(first.pid_file), wait=False, subdir="second")
    assert second.wait_exit(10) == 1
    assert str(first.proc.pid) in second.log(), second.log()
    assert "Traceback" not in second.log()
    # the first one is untouched
    assert first.pid_file.read_text().strip() == str(first.proc.pid)
    assert first.ask(NAME_Q) == NAME_A


# --- signals ---------------------------------------------------------------------------

def test_term_answers_the_question_in_flight_then_exits_0(start_daemon):
    daemon = start_daemon(workers=2)
    worker_pids = [w.pid for w in daemon.workers()]
    with daemon.connect() as asking, daemon.connect() as idle:
        asking.sendall(NAME_Q)
        assert recv_until(asking, b".") == NAME_A  # accepted and being served
        asking.sendall(QUEST_Q + b"\r\n" + COLOR_Q)
        daemon.signal(signal.SIGTERM)
        asking.settimeout(scaled(5))
        assert recv_all(asking) == QUEST_A + COLOR_A  # the answers, then a clean EOF
        idle.settimeout(scaled(5))
        assert idle.recv(100) == b""  # an idle connection is closed
    t0 = time.monotonic()
    assert daemon.wait_exit(10) == 0
    assert time.monotonic() - t0 < scaled(5)
    assert all(gone(pid) for pid in worker_pids)
    assert not daemon.pid_file.exists()
    assert refused(daemon.port)


def test_term_answers_questions_received_but_not_yet_read(start_daemon):
    """Force the race: questions sit unread in the server's socket buffer when TERM comes.

    A client that does not read makes the worker stop reading from it (back-pressure),
    so complete questions are received (by the server's kernel) but not yet read
    by the worker when it gets TERM; it must still answer them all.
    """
    daemon = start_daemon(workers=1)
    stream = NAME_Q * ((48 << 20) // len(NAME_Q))
    view = memoryview(stream)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.connect(("127.0.0.1", daemon.port))
        sock.settimeout(scaled(0.5))
        sent = 0
        try:
            while sent < len(stream):
                sent += sock.send(view[sent:sent + (1 << 20)])
        except TimeoutError:
            pass  # the server stopped reading: questions are waiting in its buffer
        assert sent < len(stream), "the server never stopped reading"
        # (the last question sent may be unfinished: it is not answered)
        daemon.signal(signal.SIGTERM)
        sock.settimeout(scaled(10))
        received = bytearray()
        while chunk := sock.recv(1 << 20):
            received += chunk
        unsent_at_most = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    # Questions still in the client's own send buffer when TERM came were not
    # received by the server, so it owes no answer for them; all others it does.
    count = len(received) // len(NAME_A)
    assert received == NAME_A * count
    assert count * len(NAME_Q) >= sent - unsent_at_most - len(NAME_Q)
    assert daemon.wait_exit(10) == 0
    assert not daemon.pid_file.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["INT", "QUIT"])
def test_fast_stop_exits_0_promptly(start_daemon, sig):
    daemon = start_daemon(workers=2)
    worker_pids = [w.pid for w in daemon.workers()]
    with daemon.connect() as sock:
        sock.sendall(NAME_Q)
        assert recv_until(sock, b".") == NAME_A
        sock.sendall(b"What is your")  # unfinished: must not hold up a fast stop
        t0 = time.monotonic()
        daemon.signal(sig)
        assert daemon.wait_exit(5) == 0
        assert time.monotonic() - t0 < scaled(2.0)
        sock.settimeout(scaled(2))
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass  # a fast stop may reset
    assert wait_for(lambda: all(gone(pid) for pid in worker_pids), 2, "the workers to be gone")
    assert not daemon.pid_file.exists()


def test_killed_worker_is_replaced_with_the_same_number(start_daemon):
    daemon = start_daemon(workers=2)
    victim = wait_for(lambda: named_workers(daemon).get("lancelotd: worker 1 [gen 1]"), 5,
                      "worker 1 to name itself")
    other = next(w for w in daemon.workers() if w.pid != victim.pid)
    victim.send_signal(signal.SIGKILL)

    def replacement():
        for w in daemon.workers():
            if w.pid not in (victim.pid, other.pid) and title(w) == "lancelotd: worker 1 [gen 1]":
                return w
        return None

    new = wait_for(replacement, 2, "a new worker 1")
    assert new.pid != victim.pid
    assert sorted(w.pid for w in daemon.workers()) == sorted([new.pid, other.pid])
    for _ in range(10):
        assert daemon.ask(NAME_Q) == NAME_A
    assert daemon.proc.poll() is None


def test_workers_exit_when_the_master_is_killed(start_daemon):
    daemon = start_daemon(workers=2)
    worker_pids = [w.pid for w in daemon.workers()]
    assert daemon.ask(NAME_Q) == NAME_A
    daemon.signal(signal.SIGKILL)
    daemon.wait_exit(5)
    wait_for(lambda: all(gone(pid) for pid in worker_pids), 5, "orphaned workers to exit")
    assert refused(daemon.port)


# --- start-up errors ----------------------------------------------------------------------

def test_bind_conflict_exits_1_with_one_line_naming_the_address(start_daemon):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = start_daemon("-w", "1", "-b", f"127.0.0.1:{port}", wait=False)
        assert daemon.wait_exit(10) == 1
    lines = daemon.log().splitlines()
    assert len(lines) == 1, lines
    assert f"cannot bind 127.0.0.1:{port}" in lines[0]
    assert not daemon.pid_file.exists()


# --- the command line ---------------------------------------------------------------------

def test_check_config_ok(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text("""
[server]
workers = 2
bind = ["127.0.0.1:1060"]

[protocol]
unknown_answer = "Ni."
max_question_bytes = 100
idle_timeout = 5.5

[answers]
"What is your name?" = "Arthur."
""")
    result = lancelotd_cli("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    # A file holding only an [answers] table is a complete config.
    path.write_text('[answers]\n"Who?" = "Me."\n')
    assert lancelotd_cli("check-config", "-c", str(path)).returncode == 0


def test_check_config_names_every_problem_with_its_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("""
[server]
workers = "many"
colour = "blue"

[protocol]
max_question_bytes = -1
idle_timeout = "soon"

[answers]
"No question mark" = "Fine."
"Good question?" = "Two. Dots."
""")
    result = lancelotd_cli("check-config", "-c", str(path))
    assert result.returncode != 0
    assert result.stdout.strip() != "ok"
    for key in ("server.workers", "server.colour", "protocol.max_question_bytes", "protocol.idle_timeout",
                "No question mark", "Good question?"):
        assert key in result.stderr, (key, result.stderr)
    assert "Traceback" not in result.stderr
    # serve refuses the same file with the same reasons, before binding anything
    serve = lancelotd_cli("serve", "-c", str(path), "-b", "127.0.0.1:0",
                          "--pid-file", str(tmp_path / "x.pid"), timeout=20)
    assert serve.returncode == 1
    assert "server.workers" in serve.stderr
    assert not (tmp_path / "x.pid").exists()


@pytest.mark.parametrize("text", ["[server\nworkers = 2\n", None], ids=["not-toml", "missing"])
def test_check_config_unreadable_file(tmp_path, text):
    path = tmp_path / "broken.toml"
    if text is not None:
        path.write_text(text)
    result = lancelotd_cli("check-config", "-c", str(path))
    assert result.returncode != 0
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_stop_command_stops_a_running_daemon(start_daemon):
    daemon = start_daemon(workers=2)
    worker_pids = [w.pid for w in daemon.workers()]
    # In the background: the master is our child, and `stop` waits until it is
    # gone, which means reaped (by us, as init or systemd would).
    stop = subprocess.Popen([sys.executable, "-m", "lancelotd", "stop", "--pid-file", str(daemon.pid_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        assert daemon.wait_exit(10) == 0
        out, err = stop.communicate(timeout=scaled(10))
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.wait()
    assert stop.returncode == 0, err
    assert str(daemon.proc.pid) in out
    assert all(gone(pid) for pid in worker_pids)
    assert not daemon.pid_file.exists()
    # nothing to stop any more: success (LSB), with a clear word, not a traceback
    again = lancelotd_cli("stop", "--pid-file", str(daemon.pid_file))
    assert again.returncode == 0
    assert "not running" in again.stderr and str(daemon.pid_file) in again.stderr
    assert "Traceback" not in again.stderr


def test_lancelot_ask_prints_one_answer_per_line(start_daemon):
    daemon = start_daemon(workers=1)
    result = lancelot_cli("ask", "-p", str(daemon.port), "What is your name?", "What is your quest?",
                          "What is your favorite color?", "Who are you?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [NAME_A.decode(), QUEST_A.decode(), COLOR_A.decode(),
                                          "I don't know that."]
    with_host = lancelot_cli("ask", "-H", "127.0.0.1", "-p", str(daemon.port), "What is your name?")
    assert with_host.stdout == NAME_A.decode() + "\n"


def test_lancelot_ask_against_a_closed_port_fails_clearly():
    port = free_port()
    result = lancelot_cli("ask", "-p", str(port), "What is your name?")
    assert result.returncode != 0
    assert result.stdout == ""
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert f"127.0.0.1:{port}" in message
    assert "Traceback" not in message


@pytest.mark.parametrize("program", ["lancelotd", "lancelot"])
def test_help_and_version(program):
    run = lancelotd_cli if program == "lancelotd" else lancelot_cli
    version = run("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"{program} {lancelotd.__version__}"
    helped = run("--help")
    assert helped.returncode == 0
    assert helped.stdout.startswith(f"usage: {program}")
    commands = ("serve", "check-config", "stop") if program == "lancelotd" else ("ask",)
    for command in commands:
        assert command in helped.stdout
        sub = run(command, "--help")
        assert sub.returncode == 0 and "usage:" in sub.stdout


def test_console_scripts_are_installed():
    for program in ("lancelotd", "lancelot"):
        script = BIN / program
        assert script.exists(), script
        result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                                timeout=scaled(20))
        assert result.returncode == 0 and lancelotd.__version__ in result.stdout


def test_reopen_logs_signals_only_a_live_master(start_daemon, tmp_path):
    """logrotate's fallback: USR1 through a command that checks the PID file names a lancelotd master."""
    log = tmp_path / "served.log"
    d = start_daemon("-w", "2", "--log-file", str(log), wait=False)
    wait_for(lambda: log.exists() and len(re.findall(r"spawned worker", log.read_text())) >= 2, 10,
             "the master and its workers")
    d.log_file = log
    d.wait_ready(workers=2)
    log.rename(tmp_path / "served.log.1")
    done = lancelotd_cli("reopen-logs", "--pid-file", str(d.pid_file))
    assert done.returncode == 0, done.stderr
    wait_log(log, r"log file reopened", count=3)  # the master and both workers

    # A PID file that names some other process: refused, and that process is not signalled.
    decoy = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                              "signal.signal(signal.SIGUSR1, lambda *a: print('signalled', flush=True)); "
                              "time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        fake = tmp_path / "fake.pid"
        fake.write_text(f"{decoy.pid}\n")
        refused = lancelotd_cli("reopen-logs", "--pid-file", str(fake))
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "not lancelotd" in refused.stderr
    finally:
        decoy.kill()
        out, _ = decoy.communicate(scaled(10))
    assert "signalled" not in out
    gone = lancelotd_cli("reopen-logs", "--pid-file", str(tmp_path / "none.pid"))
    assert gone.returncode == 0, "nothing running, nothing to reopen: not an error for logrotate"
