"""README promises that had no test (issue 23, item 3), each checked by what the user sees.

- A lowered `max_connections_per_client` (by reload) closes nothing already open.
- During `drain_delay`, HUP, USR2, TTIN and TTOU are ignored and INT stops at once.
- USR2 is refused while a reload or an upgrade runs, and while the previous master drains.
- The accepted socket's send buffer is fixed at 64 KiB (`SO_SNDBUF`, which the kernel doubles).
- An IPv4-mapped client of a dual-stack `[::]` listener is its IPv4 address for the access
  rules, the per-client count, `status` and the access log.

Real daemons on loopback (conftest's `start_daemon`, or a socket-activated one started and
reaped here), real signals, waits on log lines, the PID file and `status`; no fixed sleeps.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    NAME_A,
    NAME_Q,
    SYS_PIDFD_GETFD,
    Backlog,
    admitted,
    ask_on,
    clean_env,
    connect,
    holder_of,
    lancelotd_cli,
    live_children,
    open_files,
    read,
    read_pid,
    reap_group,
    recv_until,
    scaled,
    served,
    server_inode,
    sleeping_in,
    status_json,
    wait_child_exit,
    wait_for,
    wait_log,
    wait_pool,
    wait_refused,
    workers_of,
)

SEND_BUFFER = 64 * 1024  # the README's figure; the kernel reports twice what was set


class BrokenPromise(AssertionError):
    """The README's promise itself does not hold: what a strict xfail here expects, and only that."""


def conf(workers: int = 1, access: str = "", balancer: str = "", lifecycle: str = "", tail: str = "") -> str:
    return (f"[server]\nworkers = {workers}\n[lifecycle]\n{lifecycle}\n[access]\n{access}\n"
            f"[balancer]\n{balancer}\n{tail}")


# --- a lowered max_connections_per_client -----------------------------------------------------

def test_a_lowered_per_client_limit_closes_nothing_open(start_daemon):
    """4 connections from one address, then a reload to a limit of 2: all 4 are handed to the
    new generation and keep being answered; only new ones are refused, until fewer than 2 stay."""
    d = start_daemon(config=conf(access="max_connections_per_client = 4"), workers=1)
    mine = [connect(d.port, "127.0.0.2") for _ in range(4)]
    try:
        assert all(served(sock) for sock in mine)
        d.config_file.write_text(conf(access="max_connections_per_client = 2"))
        result = lancelotd_cli("reload", "--pid-file", str(d.pid_file))
        assert result.returncode == 0, result.stdout + result.stderr
        (new,) = wait_pool(d.proc.pid, 1, generation=2)  # the old worker handed over and left
        assert {holder_of(sock, [new]) for sock in mine} == {new}, d.log()[-3000:]
        for sock in mine:  # open, and answered by the new generation
            assert ask_on(sock, NAME_Q) == NAME_A
        assert not admitted(d.port, "127.0.0.2")  # the new limit holds for new connections
        wait_refused(d.pid_file, per_client_limit=1, denied_open=0)
        mine.pop().close()
        mine.pop().close()
        assert not admitted(d.port, "127.0.0.2")  # 2 open: still at the limit
        mine.pop().close()
        wait_for(lambda: admitted(d.port, "127.0.0.2"), 10, "127.0.0.2 admitted below the new limit")
        assert ask_on(mine[0], NAME_Q) == NAME_A
    finally:
        for sock in mine:
            sock.close()


# --- signals during drain_delay ---------------------------------------------------------------

def test_drain_delay_ignores_hup_usr2_ttin_ttou_and_obeys_int(start_daemon):
    """TERM with drain_delay: the host keeps serving for the delay.  A reload (to 3 workers),
    an upgrade, one worker more or fewer would each change what the operator sees; none does.
    INT then stops the master at once, long before the delay is over."""
    d = start_daemon(config=conf(workers=2, balancer="drain_delay = 300"), workers=2)
    master = d.proc.pid
    pool = wait_pool(master, 2, generation=1)
    d.config_file.write_text(conf(workers=3, balancer="drain_delay = 300"))
    with d.connect() as held:
        assert ask_on(held, NAME_Q) == NAME_A
        d.signal(signal.SIGTERM)
        wait_log(d.log_file, r"TERM: the agent and /ready say drain")
        for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
            d.signal(sig)
            wait_log(d.log_file, rf"{sig.name[3:]} ignored: stopping")
        # The master's table, published after those signals were handled: nothing changed.
        status = status_json(d.pid_file)
        assert status["master"]["pid"] == master and status["master"]["generation"] == 1, status
        assert status["master"]["workers_target"] == 2, status
        assert status["reloads"]["count"] == 0, status
        assert {w["pid"] for w in status["workers"]} == set(pool), status
        assert {c.pid for c in live_children(master) or []} == set(pool)  # no successor either
        assert read_pid(d.pid_file) == master and not Path(f"{d.pid_file}.oldbin").exists()
        log = d.log()
        assert "reloading" not in log and "upgrade: starting" not in log, log
        # Still serving, as drain_delay promises: the held connection and new ones.
        assert ask_on(held, NAME_Q) == NAME_A
        assert d.ask(NAME_Q) == NAME_A
        interrupted = time.monotonic()
        d.signal(signal.SIGINT)
        assert d.wait_exit(10) == 0, d.log()[-3000:]
    assert time.monotonic() - interrupted < scaled(10)  # not the 300 s of drain_delay
    assert "drain_delay over" not in d.log()
    assert not d.pid_file.exists()


# --- USR2 refused while something else runs ---------------------------------------------------

def test_usr2_is_refused_while_a_reload_runs(start_daemon):
    """The reload's new worker takes a while to boot; a USR2 meanwhile starts no new master,
    and the reload completes as it would have."""
    d = start_daemon(config=conf(workers=1), workers=1,
                     env={"LANCELOTD_TEST_BOOT_DELAY": f"{scaled(3)}@2:1"})
    master = d.proc.pid
    d.signal(signal.SIGHUP)
    wait_log(d.log_file, r"reloading")
    d.signal(signal.SIGUSR2)
    wait_log(d.log_file, r"USR2: an upgrade or reload is under way: ignored")
    wait_log(d.log_file, r"reload done: generation 2", timeout=20)
    wait_pool(master, 1, generation=2)  # only workers below the master: no successor
    log = d.log()
    assert "reload done: generation 2" not in log[:log.index("USR2: an upgrade or reload")], log
    assert "upgrade: starting" not in log, log
    assert read_pid(d.pid_file) == master and not Path(f"{d.pid_file}.oldbin").exists()
    assert d.ask(NAME_Q) == NAME_A


def test_usr2_is_refused_during_an_upgrade_and_while_the_old_master_drains(start_daemon, tmp_path):
    """A second USR2 while the new master boots starts no third master; once the new one has
    taken over, a USR2 to it while the old master still drains (a client holds an old worker)
    is refused too: the .oldbin name of the draining master is not lost.  Both refusals leave
    exactly two masters, the PID file on the new one, every client answered."""
    slow = tmp_path / "slow-successor"
    d = start_daemon(config=conf(workers=1, lifecycle="graceful_timeout = 120"), workers=1,
                     env={"LANCELOTD_TEST_BOOT_DELAY": f"{scaled(3)}@1:1",
                          "LANCELOTD_TEST_BOOT_DELAY_IF": str(slow)})
    old = d.proc.pid
    (old_worker,) = wait_pool(old, 1, generation=1)
    oldbin = Path(f"{d.pid_file}.oldbin")
    new = 0
    try:
        with d.connect() as holder:
            assert ask_on(holder, NAME_Q) == NAME_A
            backlog = Backlog(holder).fill()  # the old worker owes answers: the old master must stay
            slow.touch()  # only the successor's worker boots slowly
            d.signal(signal.SIGUSR2)
            new = int(wait_log(d.log_file, r"upgrade: new master (\d+) started")[0].group(1))
            d.signal(signal.SIGUSR2)
            wait_log(d.log_file, r"USR2: an upgrade or reload is under way: ignored")
            wait_log(d.log_file, rf"upgrade: new master {new} is ready", timeout=20)
            wait_for(lambda: read_pid(d.pid_file) == new and read_pid(oldbin) == old, 10,
                     "the new master in the PID file, the old one under .oldbin")
            wait_log(d.log_file, r"upgrade: let in")
            os.kill(new, signal.SIGUSR2)
            wait_log(d.log_file, rf"\[{new}\].*USR2 ignored: the previous master \({old}\) is still draining")
            assert d.ask(NAME_Q) == NAME_A  # the new master serves
            assert len(re.findall(r"upgrade: starting a new master", d.log())) == 1, d.log()[-3000:]
            assert [c.pid for c in live_children(old) or []] == [old_worker]
            assert len(workers_of(new)) == len(live_children(new) or []) == 1  # no third master
            assert read_pid(d.pid_file) == new and read_pid(oldbin) == old
            backlog.settle()
            assert ask_on(holder, NAME_Q) == NAME_A
        assert d.wait_exit(20) == 0  # the old master leaves with its last client
        assert not oldbin.exists() and read_pid(d.pid_file) == new
    finally:
        if new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(new, signal.SIGTERM)
    assert wait_child_exit(new, 20) == 0


# --- the accepted socket's send buffer -------------------------------------------------------

def duplicate(pid: int, fd: int) -> socket.socket:
    """Our copy of descriptor `fd` of process `pid` (pidfd_getfd: the same open socket)."""
    import ctypes
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())} (needs root or ptrace rights)")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=dup)


def their_socket(pid: int, sock: socket.socket) -> socket.socket:
    """A duplicate of the server side of our connection `sock`, taken from process `pid`."""
    target = f"socket:[{server_inode(sock)}]"
    fd = next((fd for fd, name in open_files(pid).items() if name == target), None)
    assert fd is not None, f"process {pid} does not hold {target}"
    return duplicate(pid, fd)


def listener_send_buffer(pid: int, port: int) -> int | None:
    """SO_SNDBUF of the TCP listener on `port` that process `pid` holds (None: not found)."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:["):
                continue
        except OSError:
            continue
        with duplicate(pid, int(name)) as sock:
            if (sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port):
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    return None


def kernel_default_send_buffer() -> int:
    with socket.create_server(("127.0.0.1", 0)) as plain, \
            socket.create_connection(plain.getsockname()):
        accepted, _ = plain.accept()
        with accepted:
            return accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def test_accepted_sockets_send_buffer_is_64_kib(start_daemon):
    """Asked of the very socket a worker accepted (and of the same connection once handed to the
    next generation), against a socket accepted with the kernel's defaults, which autotunes.
    The worker sets the bound on the listener when it starts serving (accepted sockets inherit
    it): that is the readiness this test waits for before it connects."""
    assert kernel_default_send_buffer() != 2 * SEND_BUFFER, "the default is the figure: proves nothing"
    d = start_daemon(workers=1)
    (worker,) = wait_pool(d.proc.pid, 1)
    wait_for(lambda: listener_send_buffer(worker, d.port) == 2 * SEND_BUFFER, 10,
             "the worker to bound its listener's send buffer")
    with d.connect() as sock:
        assert ask_on(sock, NAME_Q) == NAME_A
        with their_socket(worker, sock) as theirs:
            assert theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * SEND_BUFFER
        result = lancelotd_cli("reload", "--pid-file", str(d.pid_file))
        assert result.returncode == 0, result.stdout + result.stderr
        (new,) = wait_pool(d.proc.pid, 1, generation=2)
        assert ask_on(sock, NAME_Q) == NAME_A
        with their_socket(new, sock) as theirs:
            assert theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * SEND_BUFFER


def test_a_connection_queued_before_the_first_worker_serves_gets_the_64_kib_send_buffer(start_daemon):
    """The first worker boots slowly; a client connects meanwhile (the PID file says the master
    listens) and is accepted once the worker serves.  Only the promise itself may fail as
    expected (BrokenPromise); anything else going wrong is a plain failure."""
    d = start_daemon(workers=1, env={"LANCELOTD_TEST_BOOT_DELAY": f"{scaled(2)}@1:1"}, wait=False)
    d.wait_ready(timeout=15)  # the PID file and the port: the master has bound the listener
    booting = wait_for(lambda: live_children(d.proc.pid), 10, "the first worker forked")[0].pid
    wait_for(lambda: sleeping_in(booting, "nanosleep"), 10, "the worker in its boot delay")
    with d.connect() as sock:  # the handshake completes now, in the listener's queue
        sock.sendall(NAME_Q)
        assert recv_until(sock, b".") == NAME_A  # accepted by the worker, once it serves
        (worker,) = wait_pool(d.proc.pid, 1)
        assert worker == booting
        with their_socket(worker, sock) as theirs:
            value = theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if value != 2 * SEND_BUFFER:
        raise BrokenPromise(f"SO_SNDBUF {value}, not {2 * SEND_BUFFER}, though the listener has "
                            f"{listener_send_buffer(d.proc.pid, d.port)} now (set by the worker, serving)")


# --- an IPv4-mapped client on a dual-stack [::] listener ---------------------------------------

def dual_stack_listener() -> socket.socket:
    """[::]:0 taking IPv4 too, as systemd's ListenStream=PORT binds it (BindIPv6Only=default)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as e:
        pytest.skip(f"no IPv6 here: {e}")
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        sock.listen(64)
    except OSError as e:
        sock.close()
        pytest.skip(f"cannot bind a dual-stack [::] socket here: {e}")
    return sock


# systemd's hand-over: the socket as fd 3, LISTEN_FDS=1, LISTEN_PID the daemon's own (exec keeps it).
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""


@contextlib.contextmanager
def activated_daemon(tmp_path: Path, listener: socket.socket, config: str) -> Iterator[subprocess.Popen]:
    """lancelotd with `listener` as its socket-activated fd 3 (ACTIVATE); killed and reaped, with
    its workers, whatever happens."""
    (tmp_path / "lancelotd.toml").write_text(config)
    fd = listener.fileno()
    cmd = [sys.executable, "-c", ACTIVATE, str(fd), sys.executable, "-m", "lancelotd", "serve",
           "--pid-file", str(tmp_path / "lancelotd.pid"), "-c", str(tmp_path / "lancelotd.toml")]
    with open(tmp_path / "lancelotd.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(fd,),
                                start_new_session=True, env=clean_env())
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(scaled(10))
        reap_group(proc.pid)


@pytest.fixture
def dual_stack(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """A ready lancelotd on an activated dual-stack [::]:PORT, IPv4 loopback allowed, 127.0.0.2
    denied, one connection per client (IPv6 clients counted per /64), an access log:
    (port, PID file, access log).  It is stopped with TERM at the end, and must exit 0."""
    listener = dual_stack_listener()
    port = listener.getsockname()[1]
    access_log = tmp_path / "access.log"
    config = (f'[server]\nworkers = 1\nbind = ["[::]:{port}"]\n'
              '[access]\nallow = ["127.0.0.0/8"]\ndeny = ["127.0.0.2"]\n'
              "max_connections_per_client = 1\nmax_connections_per_client_ipv6_prefix = 64\n"
              f'[log]\naccess = "{access_log}"\n')
    pid_file, log = tmp_path / "lancelotd.pid", tmp_path / "lancelotd.log"
    with listener, activated_daemon(tmp_path, listener, config) as proc:
        listener.close()  # the daemon holds it now

        def pid_file_written() -> bool:
            assert proc.poll() is None, f"lancelotd exited with {proc.returncode}:\n{read(log)}"
            return read_pid(pid_file) == proc.pid
        wait_for(pid_file_written, 15, "the PID file")
        wait_log(log, rf"listening on \[::\]:{port} \(inherited\)")  # the activated socket, no other
        wait_pool(proc.pid, 1)
        yield port, pid_file, access_log
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(scaled(15)) == 0, read(log)


def test_an_ipv4_mapped_client_is_judged_and_counted_as_its_ipv4_address(dual_stack):
    """On a dual-stack [::] listener an IPv4 client arrives as ::ffff:a.b.c.d.  The IPv4 rules
    must judge it (deny 127.0.0.2, allow 127.0.0.0/8 only: ::1 is refused), and it must be
    counted per IPv4 address: with IPv6 clients counted per /64, a mapped address counted as
    IPv6 would put 127.0.0.3 and 127.0.0.4 in one block; both are admitted."""
    port, pid_file, _ = dual_stack
    assert not admitted(port, "127.0.0.2")  # denied by its IPv4 address
    assert not admitted(port, "::1", "::1")  # not in the IPv4 allow-list
    wait_refused(pid_file, denied=2, per_client_limit=0)
    with connect(port, "127.0.0.3") as first:
        assert served(first)
        assert not admitted(port, "127.0.0.3")  # its own limit of 1
        assert not admitted(port, "::ffff:127.0.0.3", "::ffff:127.0.0.1")  # the same client
        assert admitted(port, "127.0.0.4")  # another client, not the same /64
        wait_refused(pid_file, denied=2, per_client_limit=2)
        assert ask_on(first, NAME_Q) == NAME_A


def test_an_ipv4_mapped_client_is_named_by_its_ipv4_address_in_status_and_the_access_log(dual_stack):
    port, pid_file, access_log = dual_stack
    with connect(port, "127.0.0.3") as sock:
        assert served(sock)
        client = f"127.0.0.3:{sock.getsockname()[1]}"

        def clients() -> list[str] | None:
            recent = [c for w in status_json(pid_file)["workers"] for c in w["recent_clients"]]
            return recent or None
        recent = wait_for(clients, 10, "a client in status's recent_clients")
    wait_log(access_log, r"end=client_close")
    log = read(access_log)
    if recent != [client] or not re.search(rf"^\S+ {re.escape(client)} .*end=client_close", log, re.M):
        raise BrokenPromise(f"status names {recent}, the access log says:\n{log}")
