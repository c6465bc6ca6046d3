"""Issue 21, item 1: socket activation and the config agree, or the daemon says why not.

The test plays systemd as test_notify.py does: its own listening socket goes in as fd 3 with
LISTEN_FDS=1 and LISTEN_PID set to the daemon's PID.  (tests/test_systemd.py has the same
under the real systemd, with lancelotd.socket.)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil
from helpers import NAME_A, NAME_Q, REPO, WRAPPER, ask, ask_on, recv_all, scaled, title, wait_for, wait_log

from lancelotd import activation
from lancelotd.activation import ACTIVATED
from lancelotd.proxyproto import PROXY, build

UNNAMED = r"socket-activated 127\.0\.0\.1:{port} is not in the configuration: served with the defaults"


def proxy_config(port: int, bind: str = "") -> str:
    server = f'bind = ["{bind}"]\n' if bind else ""
    return (f"[server]\nworkers = 1\n{server}[[listener]]\nbind = \"127.0.0.1:{port}\"\n"
            "proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.1\"]\n")


def activated_socket() -> tuple[socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    return listener, listener.getsockname()[1]


# --- matching -------------------------------------------------------------------------------

def test_match_by_address_however_spelled():
    activated = [ACTIVATED + "0.0.0.0:1060", ACTIVATED + "[::1]:1061", ACTIVATED + "127.0.0.1:1062"]
    matched, unnamed = activation.match([":1060", "[0:0::1]:1061", "127.0.0.1:1063"], activated)
    assert matched == {":1060": ACTIVATED + "0.0.0.0:1060", "[0:0::1]:1061": ACTIVATED + "[::1]:1061"}
    assert unnamed == [ACTIVATED + "127.0.0.1:1062"]
    # Port 0 is a port of its own: never an activated socket's.
    assert activation.match(["127.0.0.1:0"], [ACTIVATED + "127.0.0.1:0"]) == ({}, [ACTIVATED + "127.0.0.1:0"])


def test_report_names_both_sides():
    lines = activation.report(["127.0.0.1:1063"], [ACTIVATED + "127.0.0.1:1062"])
    assert lines == [activation.unbound_note("127.0.0.1:1063"),
                     activation.unnamed_warning(ACTIVATED + "127.0.0.1:1062")]
    assert activation.report(["0.0.0.0:1060"], [ACTIVATED + "0.0.0.0:1060"]) == []


# --- the daemon -----------------------------------------------------------------------------

def test_activated_socket_takes_its_listeners_proxy_settings(spawn, tmp_path):
    listener, port = activated_socket()
    config = tmp_path / "proxy.toml"
    config.write_text(proxy_config(port))
    try:
        d = spawn("-w", "1", "-c", str(config), listen=listener, own_pid=("LISTEN_PID",),
                  env={"LISTEN_FDS": "1"})
    finally:
        listener.close()
    d.wait_pid_file()
    address = rf"127\.0\.0\.1:{port}"
    wait_log(d.log_file, rf"socket-activated {address} is {address} \(PROXY protocol v2\)")
    # HAProxy's send-proxy-v2: the header, then the client's bytes.
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(5)) as sock:
        sock.sendall(build(PROXY, ("198.18.0.2", 31222), ("198.18.0.1", 1060)))
        assert ask_on(sock, NAME_Q) == NAME_A
    # Without the header, the listener wants one: closed, never answered as a question.
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(5)) as sock:
        sock.sendall(NAME_Q + b"\r\n" + bytes(16))
        assert b"Error" not in recv_all(sock)
    assert "not in the configuration" not in d.log()


def test_unnamed_activated_socket_is_served_with_a_warning_and_the_config_is_bound(spawn):
    listener, port = activated_socket()
    try:
        d = spawn("-w", "1", "-b", "127.0.0.1:0", listen=listener, own_pid=("LISTEN_PID",),
                  env={"LISTEN_FDS": "1"})
    finally:
        listener.close()
    d.wait_pid_file()
    own = int(wait_log(d.log_file, r"listening on 127\.0\.0\.1:(\d+)$")[0].group(1))
    assert own != port
    wait_log(d.log_file, UNNAMED.format(port=port))
    assert ask(port) == NAME_A  # systemd's socket: clients connect there
    assert ask(own) == NAME_A  # the config's address, bound by the daemon
    d.signal(signal.SIGHUP)  # and again at every reload
    wait_log(d.log_file, r"reload done")
    assert len(re.findall(UNNAMED.format(port=port), d.log())) == 2, d.log()
    assert ask(port) == NAME_A and ask(own) == NAME_A


def test_address_held_by_a_dual_stack_activated_socket_names_the_mismatch(spawn):
    listener = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True, backlog=8)
    port = listener.getsockname()[1]
    try:
        d = spawn("-w", "1", "-b", f"0.0.0.0:{port}", listen=listener, own_pid=("LISTEN_PID",),
                  env={"LISTEN_FDS": "1"})
        assert d.proc.wait(timeout=scaled(10)) == 1
    finally:
        listener.close()
    log = d.log()
    assert f"cannot bind 0.0.0.0:{port}" in log and f"socket activation gave [::]:{port}" in log, log
    assert "Traceback" not in log


# --- check-config under the same environment ------------------------------------------------

def check_config_activated(tmp_path: Path, config: str,
                           listener: socket.socket) -> subprocess.CompletedProcess:
    path = tmp_path / "lancelotd.toml"
    path.write_text(config)
    env = dict(os.environ, LISTEN_FDS="1", TEST_OWN_PID="LISTEN_PID", TEST_LISTEN_FD=str(listener.fileno()))
    env.pop("LANCELOTD_CONFIG", None)
    return subprocess.run([sys.executable, "-c", WRAPPER, "-m", "lancelotd", "check-config", "-c", str(path)],
                          env=env, pass_fds=(listener.fileno(),), capture_output=True, text=True,
                          timeout=scaled(30))


def test_check_config_reports_the_mismatch(tmp_path):
    listener, port = activated_socket()
    with listener:
        agree = check_config_activated(tmp_path, proxy_config(port), listener)
        disagree = check_config_activated(tmp_path, proxy_config(port + 1 if port < 65535 else 1), listener)
    assert agree.returncode == 0, agree.stderr
    assert agree.stdout == "ok\n" and "warning" not in agree.stderr
    assert disagree.returncode == 0, disagree.stderr  # the daemon starts: check-config says what it will do
    assert re.search(UNNAMED.format(port=port), disagree.stderr), disagree.stderr
    assert "has no activated socket: lancelotd binds it itself" in disagree.stderr


# --- the shipped files ----------------------------------------------------------------------

def test_shipped_socket_unit_and_config_agree():
    unit = (REPO / "systemd/lancelotd.socket").read_text()
    streams = re.findall(r"^ListenStream=(.+)$", unit, re.M)
    config = tomllib.loads((REPO / "etc/lancelotd.toml").read_text())
    addresses = config["server"]["bind"] + [x["bind"] for x in config.get("listener", [])]
    matched, unnamed = activation.match(addresses, [ACTIVATED + s for s in streams])
    assert set(matched) == set(addresses) and not unnamed, (streams, addresses)


def test_process_titles_survive_the_activation_variables_leaving_the_environment(spawn, tmp_path):
    """LISTEN_PID first in the environment (WRAPPER): the daemon removes it before its titles are
    set, which left `ps` showing the python command line for the master and every worker."""
    listener, port = activated_socket()
    config = tmp_path / "activated.toml"
    config.write_text(f'[server]\nworkers = 2\nbind = ["127.0.0.1:{port}"]\n')
    try:
        d = spawn("-c", str(config), listen=listener, own_pid=("LISTEN_PID",), env={"LISTEN_FDS": "1"})
    finally:
        listener.close()
    master = psutil.Process(d.wait_pid_file())
    wait_log(d.log_file, r"ready: 2 workers serving")
    assert title(master).startswith("lancelotd: master ["), title(master)
    workers = sorted(title(w) for w in master.children())
    assert workers == ["lancelotd: worker 1 [gen 1]", "lancelotd: worker 2 [gen 1]"], workers
    assert ask(port) == NAME_A


def test_no_warning_without_activation(spawn):
    d = spawn("-w", "1", "-b", "127.0.0.1:0")
    d.wait_pid_file()
    wait_for(lambda: "listening on" in d.log(), 10, "the listening line")
    assert "socket-activated" not in d.log()
