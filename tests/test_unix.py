"""Issue 21, item 6: UNIX-socket listeners, served exactly like TCP.

`bind = "unix:PATH"` (or `-b unix:PATH`, or a [[listener]] with mode, owner and group): the
same answers, kept across a reload (the same socket: its file never changes) and a USR2
upgrade, its clients handed over like TCP's; the access rules do not apply to it; a stale
socket file (a dead master's) is replaced, a live one refused; the file goes at a stop.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

from helpers import (
    NAME_A,
    NAME_Q,
    ask,
    ask_on,
    clean_env,
    lancelotd_cli,
    read_pid,
    recv_all,
    scaled,
    status_json,
    wait_child_exit,
    wait_for,
)


def unix_ask(path: Path, question: bytes = NAME_Q) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(scaled(5))
        sock.connect(str(path))
        return ask_on(sock, question)


def test_served_with_tcp_and_shown_in_status(start_daemon, tmp_path):
    path = tmp_path / "l.sock"
    d = start_daemon("-b", "127.0.0.1:0", "-b", f"unix:{path}", workers=2)
    assert unix_ask(path) == NAME_A
    assert ask(d.port) == NAME_A
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660  # the default, as php-fpm's
    assert f"listening on unix:{path}" in d.log()

    def listed() -> bool:
        return any(x["address"] == f"unix:{path}" for x in status_json(d.pid_file)["listeners"])
    wait_for(listed, 10, "status to list the UNIX socket")
    human = lancelotd_cli("status", "--pid-file", str(d.pid_file)).stdout
    assert f"unix:{path} (service)" in human, human


def test_listener_mode_owner_group_and_no_access_rules(start_daemon, tmp_path):
    path = tmp_path / "l.sock"
    owner = f'owner = "{os.getuid()}"\ngroup = "{os.getgid()}"\n'
    listener = f'[[listener]]\nbind = "unix:{path}"\nmode = "0600"\n{owner}'
    d = start_daemon(config=f'[access]\ndeny = ["all"]\n{listener}', workers=1)
    info = os.stat(path)
    assert stat.S_IMODE(info.st_mode) == 0o600 and (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    assert unix_ask(path) == NAME_A  # deny = ["all"] is for addresses: a UNIX socket has none
    with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(5)) as sock:
        assert recv_all(sock) == b""  # TCP: refused by the rule


def test_stale_file_replaced_live_one_refused(start_daemon, tmp_path):
    path = tmp_path / "l.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # its file stays: a dead master's
    d = start_daemon("-b", "127.0.0.1:0", "-b", f"unix:{path}", workers=1)
    assert unix_ask(path) == NAME_A
    # A second daemon on the same file: refused while the first one listens.
    second = subprocess.run([sys.executable, "-m", "lancelotd", "serve", "-b", f"unix:{path}", "--pid-file",
                             str(tmp_path / "second.pid"), "-w", "1"], capture_output=True, text=True,
                            timeout=scaled(30), env=clean_env())
    assert second.returncode == 1 and "a live process listens on it" in second.stderr, second.stderr
    assert unix_ask(path) == NAME_A
    d.signal(signal.SIGTERM)  # a stop removes the file
    assert d.wait_exit(15) == 0
    assert not path.exists()


def test_kept_across_reload_with_clients_handed_over(start_daemon, tmp_path):
    path = tmp_path / "l.sock"
    d = start_daemon("-b", "127.0.0.1:0", "-b", f"unix:{path}", workers=1)
    inode = os.stat(path).st_ino
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(scaled(5))
        sock.connect(str(path))
        assert ask_on(sock, NAME_Q) == NAME_A
        result = lancelotd_cli("reload", "--pid-file", str(d.pid_file), timeout=30)
        assert result.returncode == 0, result
        wait_for(lambda: "handed over" in d.log() or "exiting" in d.log(), 10, "the old worker to leave")
        assert ask_on(sock, NAME_Q) == NAME_A  # the same connection, served by the new worker
    assert os.stat(path).st_ino == inode  # the same socket: nothing was unbound
    assert unix_ask(path) == NAME_A


def test_kept_across_usr2(start_daemon, tmp_path):
    path = tmp_path / "l.sock"
    d = start_daemon("-b", "127.0.0.1:0", "-b", f"unix:{path}", workers=1)
    old = d.proc.pid
    inode = os.stat(path).st_ino
    d.signal(signal.SIGUSR2)
    new = wait_for(lambda: (pid := read_pid(d.pid_file)) != old and pid, 15, "the new master")
    assert d.wait_exit(15) == 0
    try:
        assert unix_ask(path) == NAME_A and os.stat(path).st_ino == inode
    finally:
        os.kill(new, signal.SIGTERM)  # type: ignore[arg-type]
        assert wait_child_exit(new) == 0  # type: ignore[arg-type]
    assert not path.exists()


def test_config_checks(tmp_path):
    cases = {
        '[server]\nbind = ["unix:relative.sock"]\n': "must be absolute",
        '[[listener]]\nbind = "127.0.0.1:1060"\nmode = "0600"\n': "only for a UNIX socket",
        '[[listener]]\nbind = "unix:/run/x.sock"\nmode = "rw"\n': "must be a file mode",
        '[[listener]]\nbind = "unix:/run/x.sock"\nproxy_protocol = true\nproxy_protocol_from = ["all"]\n':
            "not supported on a UNIX socket",
        '[server]\nmetrics_bind = "unix:/run/m.sock"\n': "a TCP address",
        '[server]\nbind = ["unix:/run/x.sock", "unix:/run/x.sock"]\n': "is the same address",
    }
    for text, expected in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        result = lancelotd_cli("check-config", "-c", str(path))
        assert result.returncode == 1 and expected in result.stderr, (text, result.stderr)
