"""docs/PROMISES.md §8 with real daemons, no balancer yet: the agent port, `lancelotd drain`/`undrain`,
drain_delay at TERM, /ready and /live, closing drained and old connections at idle points,
and `lancelot ask` asking again once when its connection ends under a question.

The agent port is HAProxy's agent-check: connect, read one line until EOF.  Ports are
ephemeral, learned from the master's log lines, except where a USR2 successor must bind the
very same agent port (then a free port is picked first).  No fixed sleeps as waits: the
tests wait on the agent's answer, the log, the PID file or a socket's EOF.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import (
    LISTENING,
    NAME_A,
    NAME_Q,
    Backlog,
    CheckedThread,
    Daemon,
    NotifySocket,
    ask_on,
    assert_running_schema,
    lancelot_cli,
    lancelotd_cli,
    listening_ports,
    read_pid,
    recv_all,
    recv_until,
    scaled,
    status_json,
    wait_child_exit,
    wait_for,
    wait_log,
)

from lancelotd.config import ConfigError, from_dict

AGENT_LINE = re.compile(r"\[(\d+)\] master: agent-check on (\S+):(\d+)$", re.M)
METRICS_LINE = re.compile(r"\[(\d+)\] master: metrics on (http://\S+)/metrics$", re.M)
READY, DRAIN = b"ready 100%\n", b"drain\n"


def conf(workers: int = 1, balancer: str = "", agent: str = "127.0.0.1:0", graceful: float = 10) -> str:
    return f"""
[server]
workers = {workers}
metrics_bind = "127.0.0.1:0"
[lifecycle]
graceful_timeout = {graceful}
[balancer]
agent_bind = "{agent}"
{balancer}
"""


# --- talking to the master ---------------------------------------------------------------

def agent_port(d: Daemon, master: int | None = None) -> int:
    master = master or d.proc.pid

    def port() -> int | None:
        found = [int(m.group(3)) for m in AGENT_LINE.finditer(d.log()) if int(m.group(1)) == master]
        return found[-1] if found else None
    return wait_for(port, 10, f"master {master} to log its agent port")  # type: ignore[return-value]


def base_url(d: Daemon, master: int | None = None) -> str:
    master = master or d.proc.pid

    def url() -> str | None:
        found = [m.group(2) for m in METRICS_LINE.finditer(d.log()) if int(m.group(1)) == master]
        return found[-1] if found else None
    return wait_for(url, 10, f"master {master} to log its metrics address")  # type: ignore[return-value]


def agent(port: int) -> bytes:
    """What the agent answers: everything until its close."""
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(5)) as sock:
        return recv_all(sock)


def wait_agent(port: int, answer: bytes, timeout: float = 5.0) -> None:
    seen = [b""]

    def says() -> bool:
        try:
            seen[0] = agent(port)
        except ConnectionRefusedError:
            seen[0] = b"(refused)"
        return seen[0] == answer
    try:
        wait_for(says, timeout, f"the agent to say {answer!r}")
    except AssertionError as e:
        raise AssertionError(f"{e}; it says {seen[0]!r}") from None


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=scaled(5)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def drain_cmd(d: Daemon, command: str = "drain") -> subprocess.CompletedProcess[str]:
    return lancelotd_cli(command, "--pid-file", str(d.pid_file))


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=scaled(5)) as response:
        text = response.read().decode()
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{label}}} (\S+)$" if label else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name} {labels} not in the metrics"
    return float(match.group(1))


def eof_times(socks: list[socket.socket], timeout: float) -> dict[socket.socket, float]:
    """When each socket saw EOF (monotonic), reading and keeping nothing; stops at timeout."""
    deadline = time.monotonic() + scaled(timeout)
    ended: dict[socket.socket, float] = {}
    while len(ended) < len(socks) and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([s for s in socks if s not in ended], [], [], left)
        for sock in readable:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                raise AssertionError("a connection was reset, not closed") from None
            assert not data, f"unexpected bytes {data!r}"
            ended[sock] = time.monotonic()
    return ended


# =========================================================================================
# 1. The agent port, drain and undrain, and where the state shows
# =========================================================================================

def test_drain_and_undrain_through_agent_ready_status_metrics_and_systemd(start_daemon, tmp_path):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        d = start_daemon(config=conf(), env={"NOTIFY_SOCKET": notify.address}, workers=1)
        port, url = agent_port(d), base_url(d)
        wait_agent(port, READY)
        assert get(url + "/ready") == (200, "ready\n")
        assert get(url + "/live") == (200, "alive\n")
        snap = status_json(d.pid_file)
        assert snap["balancer"] == {"state": "ready", "drained": False, "agent": "ready 100%"}
        assert {"agent", "metrics", "service"} == {entry["role"] for entry in snap["listeners"]}

        result = drain_cmd(d)
        assert result.returncode == 0, result.stderr
        assert f"master {d.proc.pid}: the agent says drain" in result.stdout, result.stdout
        assert Path(str(d.pid_file) + ".drain").exists()
        assert agent(port) == DRAIN  # at once: the command waited for the master to see it
        assert get(url + "/ready") == (503, "drained\n")
        assert get(url + "/live") == (200, "alive\n")
        snap = status_json(d.pid_file)
        assert_running_schema(snap)
        assert snap["balancer"] == {"state": "drained", "drained": True, "agent": "drain"}
        human = lancelotd_cli("status", "--pid-file", str(d.pid_file)).stdout
        assert "balancer: DRAINED by the operator" in human, human
        assert metric(url, "lancelotd_drained") == 1
        assert metric(url, "lancelotd_balance_state", state="drained") == 1
        said = notify.wait(lambda m: "drained" in (m.get("STATUS") or ""), what="STATUS= saying drained")
        # A drained host keeps serving: new connections too (the balancer may not know yet).
        assert d.ask(NAME_Q) == NAME_A
        assert "already drained" in drain_cmd(d).stdout

        result = drain_cmd(d, "undrain")
        assert result.returncode == 0, result.stderr
        assert "the agent says ready" in result.stdout, result.stdout
        assert agent(port) == READY
        assert get(url + "/ready") == (200, "ready\n")
        assert status_json(d.pid_file)["balancer"]["state"] == "ready"
        assert metric(url, "lancelotd_drained") == 0
        notify.wait(lambda m: re.fullmatch(r"gen \d+, [^;]*", m.get("STATUS") or ""),
                    what="STATUS= without drained", after=said)
    finally:
        notify.close()


def test_agent_says_drain_until_a_worker_serves(start_daemon):
    # The worker boots for scaled(1.5) s: the test asks before it serves, on a slow machine too.
    d = start_daemon(config=conf(), env={"LANCELOTD_TEST_BOOT_DELAY": f"{scaled(1.5)}"}, workers=1)
    port, url = agent_port(d), base_url(d)
    assert agent(port) == DRAIN  # the worker sleeps in its boot
    assert get(url + "/ready") == (503, "not_serving\n")
    assert get(url + "/live") == (200, "alive\n")
    wait_agent(port, READY)
    assert d.ask(NAME_Q) == NAME_A


def restarted(d: Daemon) -> Daemon:
    """A daemon started in the directory of an earlier one: its port is the log's last."""
    d.port = int(LISTENING.findall(d.log())[-1][1])
    return d


def test_drain_survives_a_restart(start_daemon):
    first = start_daemon(config=conf(), subdir="host", workers=1)
    # Drained while nothing runs: the master starts drained.
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    result = drain_cmd(first)
    assert result.returncode == 0 and "no master running: it will start drained" in result.stdout, result
    second = restarted(start_daemon(config=conf(), subdir="host", workers=1))
    port = agent_port(second)
    assert agent(port) == DRAIN
    wait_log(second.log_file, r"balance: drained")
    assert second.ask(NAME_Q) == NAME_A  # drained, not down
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0
    third = restarted(start_daemon(config=conf(), subdir="host", workers=1))
    port = agent_port(third)
    assert agent(port) == DRAIN
    assert drain_cmd(third, "undrain").returncode == 0
    assert agent(port) == READY


def test_usr2_successor_serves_the_agent_port_and_keeps_the_drain(start_daemon):
    with socket.socket() as probe:  # the successor must bind the very same port
        probe.bind(("127.0.0.1", 0))
        fixed = probe.getsockname()[1]
    d = start_daemon(config=conf(workers=2, agent=f"127.0.0.1:{fixed}"), workers=2)
    old = d.proc.pid
    wait_agent(fixed, READY)
    assert drain_cmd(d).returncode == 0
    assert agent(fixed) == DRAIN
    d.signal(signal.SIGUSR2)
    new = wait_for(lambda: (read_pid(d.pid_file) or old) != old and read_pid(d.pid_file), 10,
                   "the new master in the PID file")
    assert agent_port(d, new) == fixed
    wait_log(d.log_file, rf"upgrade: new master {new} is ready")
    assert d.wait_exit() == 0  # the old master is gone: whoever answers now is the new one
    assert agent(fixed) == DRAIN
    assert fixed in listening_ports(new)
    result = lancelotd_cli("undrain", "--pid-file", str(d.pid_file))
    assert result.returncode == 0 and f"master {new}: the agent says ready" in result.stdout, result
    assert agent(fixed) == READY
    os.kill(new, signal.SIGTERM)
    assert wait_child_exit(new) == 0


# =========================================================================================
# 2. TERM with drain_delay
# =========================================================================================

def test_term_with_drain_delay_says_drain_at_once_serves_on_then_refuses(start_daemon, tmp_path):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        delay = scaled(2.0)  # the clients are served during it, on a slow machine too
        d = start_daemon(config=conf(balancer=f"drain_delay = {delay}"),
                         env={"NOTIFY_SOCKET": notify.address}, workers=1)
        port, url = agent_port(d), base_url(d)
        wait_agent(port, READY)
        held = d.connect()
        assert ask_on(held, NAME_Q) == NAME_A
        termed = time.monotonic()
        d.signal(signal.SIGTERM)
        stopping = notify.wait(lambda m: m.get("STOPPING") == "1", what="STOPPING=1")
        assert stopping.at - termed < scaled(0.5)  # at TERM, not after the delay
        assert "drain_delay" in stopping.get("STATUS"), stopping.raw
        assert int(stopping.get("EXTEND_TIMEOUT_USEC")) >= (delay + 10) * 1e6, stopping.raw
        assert agent(port) == DRAIN
        assert get(url + "/ready") == (503, "stopping\n")
        assert time.monotonic() - termed < scaled(0.8), "the agent and /ready were slow to say it"
        # Still accepting and serving, new connections and the one held
        while time.monotonic() - termed < 0.75 * delay:
            assert d.ask(NAME_Q) == NAME_A
        assert d.proc.poll() is None
        assert d.wait_exit() == 0
        assert time.monotonic() - termed >= delay
        with pytest.raises(ConnectionRefusedError):
            d.connect()
        held.close()
        assert "drain_delay over: stopping" in d.log()
    finally:
        notify.close()


def test_plain_term_keeps_systemd_status_at_stopping(start_daemon, tmp_path):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        d = start_daemon(config=conf(), env={"NOTIFY_SOCKET": notify.address}, workers=1)
        wait_agent(agent_port(d), READY)
        d.signal(signal.SIGTERM)
        stopping = notify.wait(lambda m: m.get("STOPPING") == "1", what="STOPPING=1")
        assert d.wait_exit() == 0
        notify.collect(0.2)
        later = [m.raw for m in notify.messages[stopping.seq + 1:] if "STATUS" in m.fields]
        assert later == [], f"STATUS= after STOPPING=1: {later}"
    finally:
        notify.close()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGQUIT], ids=["TERM", "QUIT"])
def test_a_second_term_or_quit_ends_drain_delay(start_daemon, second):
    d = start_daemon(config=conf(balancer="drain_delay = 60"), workers=1)
    port = agent_port(d)
    wait_agent(port, READY)
    d.signal(signal.SIGTERM)
    wait_log(d.log_file, r"TERM: the agent and /ready say drain")
    assert agent(port) == DRAIN
    assert d.ask(NAME_Q) == NAME_A
    d.signal(second)
    assert d.wait_exit(10) == 0


def test_drained_long_enough_stops_without_waiting(start_daemon):
    """drain_delay, the wait past it and the threshold are all scaled: the threshold stays below
    drain_delay (the test can fail), and a slow machine's stop still beats it."""
    delay = scaled(1.5)
    d = start_daemon(config=conf(balancer=f"drain_delay = {delay}"), workers=1)
    port = agent_port(d)
    wait_agent(port, READY)
    assert drain_cmd(d).returncode == 0
    time.sleep(delay + scaled(0.1))  # the time under test: the agent has said drain longer than drain_delay
    termed = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(5) == 0
    assert time.monotonic() - termed < scaled(1.2), "it waited for drain_delay again"
    assert "stopping now" in d.log()


# =========================================================================================
# 3. Closing drained and old connections at idle points
# =========================================================================================

def test_drained_connections_close_at_idle_points_spread_over_time(start_daemon):
    d = start_daemon(config=conf(balancer="drain_spread = 3.0"), workers=1)
    port = agent_port(d)
    wait_agent(port, READY)
    idle = [d.connect() for _ in range(12)]
    for sock in idle:
        assert ask_on(sock, NAME_Q) == NAME_A
    half = d.connect()
    half.sendall(NAME_Q[:7])  # a question begun: not an idle point
    busy = d.connect()
    backlog = Backlog(busy).fill()  # answers owed: not an idle point
    drained = time.monotonic()
    assert drain_cmd(d).returncode == 0
    ended = eof_times(idle, 3.0 + 3)
    assert len(ended) == len(idle), f"{len(idle) - len(ended)} idle connections still open"
    offsets = sorted(t - drained for t in ended.values())
    assert offsets[-1] - offsets[0] >= 1.0, f"closed in a burst: {offsets}"
    assert offsets[-1] <= scaled(3.0 + 2), offsets
    # Mid-question and mid-answer clients were not cut: they get their answers, then EOF.
    assert eof_times([half], 0.2) == {}
    half.sendall(NAME_Q[7:])
    assert recv_until(half, b".") == NAME_A
    backlog.settle()  # every answer owed arrives (an EOF before would fail it)
    assert len(eof_times([half, busy], 3.0)) == 2
    for sock in [*idle, half, busy]:
        sock.close()


def test_max_connection_age_closes_old_connections_at_idle_points(start_daemon):
    """The age (and its jitter) is scaled(1 s): every client asks its question before it, on a slow
    machine too; the wait for the closes follows."""
    age = scaled(1.0)
    d = start_daemon(config=conf(balancer=f"max_connection_age = {age}\nmax_connection_age_jitter = {age}"),
                     workers=1)
    opened = time.monotonic()
    socks = [d.connect() for _ in range(4)]
    for sock in socks:
        assert ask_on(sock, NAME_Q) == NAME_A
    ended = eof_times(socks, 1.0 + 1.0 + 3)  # age, jitter and patience, scaled by eof_times
    assert len(ended) == 4, "connections older than max_connection_age still open"
    assert all(t - opened >= age for t in ended.values())
    assert d.ask(NAME_Q) == NAME_A  # the host itself serves on
    for sock in socks:
        sock.close()


# =========================================================================================
# 4. lancelot ask: the client's side of the contract
# =========================================================================================

class Hangup:
    """A server that reads each question and closes without answering, `answer_from` on."""

    def __init__(self, answer_from: int = 99) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answer_from = answer_from
        self.connections = 0
        self.thread = CheckedThread(self.serve, name="hangup server")
        self.thread.start()

    def serve(self) -> None:
        self.listener.settimeout(scaled(10))
        try:
            while True:
                sock, _ = self.listener.accept()
                self.connections += 1
                with sock:
                    question = recv_until(sock, b"?")
                    if self.connections >= self.answer_from:
                        assert question == NAME_Q
                        sock.sendall(NAME_A)
                        recv_all(sock)
        except (OSError, EOFError):
            return

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way (close() would not)
        self.listener.close()
        self.thread.finish()


def test_lancelot_ask_asks_again_once_when_the_connection_ends():
    server = Hangup()
    try:
        result = lancelot_cli("ask", "-p", str(server.port), NAME_Q.decode())
    finally:
        server.close()
    assert result.returncode == 1
    assert "closed the connection before answering" in result.stderr, result.stderr
    assert server.connections == 2  # asked again exactly once


def test_lancelot_ask_gets_the_answer_on_the_second_connection():
    server = Hangup(answer_from=2)
    try:
        result = lancelot_cli("ask", "-p", str(server.port), NAME_Q.decode())
    finally:
        server.close()
    assert (result.returncode, result.stdout) == (0, NAME_A.decode() + "\n"), result.stderr
    assert server.connections == 2


# =========================================================================================
# 5. Configuration
# =========================================================================================

@pytest.mark.parametrize("balancer, words", [
    ({"drain_delay": -1}, "balancer.drain_delay: must be a number of seconds from 0 to 300"),
    ({"drain_delay": 301}, "balancer.drain_delay"),
    ({"drain_spread": "5"}, "balancer.drain_spread"),
    ({"max_connection_age_jitter": 3}, "has no effect without max_connection_age"),
    ({"agent_bind": "127.0.0.1:1060"}, "balancer.agent_bind: '127.0.0.1:1060' is the same address"),
    ({"agent_bind": "nowhere"}, "is not HOST:PORT"),
])
def test_balancer_settings_are_checked(balancer, words):
    with pytest.raises(ConfigError) as error:
        from_dict({"server": {"bind": ["127.0.0.1:1060"]}, "balancer": balancer})
    assert any(words in problem for problem in error.value.problems), error.value.problems


def test_balancer_defaults():
    cfg = from_dict({})
    assert (cfg.agent_bind, cfg.drain_delay, cfg.drain_spread, cfg.max_connection_age) == ("", 0, 5.0, 0)
