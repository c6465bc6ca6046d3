"""Issue 21, item 4: logs people can ship.

`[log] format = "json"`: one JSON object per line with stable keys.  `[log] access`: one line
per closed connection (client, worker, duration, questions answered, bytes in and out, how it
ended), reopened on USR1; off by default, and then nothing of it exists in the worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import time
from datetime import datetime
from pathlib import Path

from helpers import NAME_A, NAME_Q, ask, ask_on, lancelotd_cli, recv_all, scaled, wait_for

QUEST_Q, QUEST_A = b"What is your quest?", b"To seek the Holy Grail."


def config(access: str, fmt: str = "text", more: str = "") -> str:
    return f'[log]\naccess = "{access}"\nformat = "{fmt}"\n{more}'


def lines(path: Path, count: int = 1) -> list[str]:
    """The access log's lines, once there are `count` (they are flushed every tick)."""
    def enough() -> list[str] | None:
        found = path.read_text().splitlines() if path.exists() else []
        return found if len(found) >= count else None
    return wait_for(enough, 10, f"{count} access log lines in {path}")  # type: ignore[return-value]


def fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split()[2:])


def test_json_line_per_connection(start_daemon, tmp_path):
    access = tmp_path / "access.log"
    d = start_daemon("--log-level", "debug", config=config(str(access), "json"), workers=1, wait=False)

    def port() -> int | None:
        for line in d.log().splitlines():
            message = json.loads(line)["message"]
            if message.startswith("listening on 127.0.0.1:"):
                return int(message.rsplit(":", 1)[1])
        return None
    d.port = wait_for(port, 10, "the listening line")  # type: ignore[assignment]
    d.wait_workers(1)
    with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(5)) as sock:
        me = sock.getsockname()
        assert ask_on(sock, NAME_Q + b"\r\n") == NAME_A
        assert ask_on(sock, QUEST_Q) == QUEST_A
    entry = json.loads(lines(access)[0])
    assert entry["client"] == f"{me[0]}:{me[1]}"
    assert entry["questions"] == 2 and entry["end"] == "client_close"
    assert entry["bytes_in"] == len(NAME_Q) + 2 + len(QUEST_Q)
    assert entry["bytes_out"] == len(NAME_A) + len(QUEST_A)
    assert entry["worker"] == 1 and entry["generation"] == 1 and entry["duration_s"] >= 0
    assert entry["time"].endswith("Z")
    # The error log is JSON too: stable keys on every line.
    for line in d.log().splitlines():
        event = json.loads(line)
        assert {"time", "level", "pid", "role", "generation", "message"} <= set(event), event
    assert any(json.loads(line).get("worker") == 1 for line in d.log().splitlines())


def test_time_and_duration_are_the_connections(start_daemon, tmp_path):
    """A line's time is when its connection ended and its duration how long it was open, not
    when the line happened to be written (lines wait for the next tick, up to a second)."""
    access = tmp_path / "access.log"
    d = start_daemon(config=config(str(access)), workers=1)
    with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(5)) as sock:
        opened = time.monotonic()
        assert ask_on(sock, NAME_Q) == NAME_A
        time.sleep(0.3)  # the connection under test: open for 0.3 s
        closing = time.time()
    open_for, closed = time.monotonic() - opened, time.time()
    line = lines(access)[0]
    duration = float(fields(line)["duration"])
    assert 0.3 <= duration <= open_for + scaled(0.2), line
    ended = datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
    assert closing - 0.001 <= ended <= closed + scaled(0.2), (line, closing, closed)


def test_text_lines_say_how_each_ended(start_daemon, tmp_path):
    access = tmp_path / "access.log"
    # idle_timeout scaled(1): only the silent connection is closed as idle, on a slow machine too.
    d = start_daemon(config=config(str(access), more=f"[protocol]\nidle_timeout = {scaled(1)}\n"), workers=1)
    with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(5)) as sock:  # a protocol error
        sock.sendall(NAME_Q + b"caf\xc3\xa9?")
        assert recv_all(sock) == NAME_A + b"Error: questions must be ASCII."
    with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(5)) as sock:  # idle
        assert recv_all(sock) == b""
    with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(5)) as sock:  # a reset
        assert ask_on(sock, NAME_Q) == NAME_A
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    found = [fields(line) for line in lines(access, 3)]
    assert found[0]["end"] == "error" and found[0]["questions"] == "1", found
    assert found[1]["end"] == "idle" and found[1]["questions"] == "0", found
    assert found[2]["end"] == "error" and found[2]["questions"] == "1" and found[2]["in"] == "18", found


def test_unix_socket_lines(start_daemon, tmp_path):
    access, path = tmp_path / "access.log", tmp_path / "l.sock"
    d = start_daemon("-b", "127.0.0.1:0", "-b", f"unix:{path}", config=config(str(access)), workers=1)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(scaled(5))
        sock.connect(str(path))
        assert ask_on(sock, NAME_Q) == NAME_A
    found = fields(lines(access)[0])
    assert found["in"] == "18" and found["out"] == str(len(NAME_A)) and found["end"] == "client_close", found
    assert d.proc.poll() is None


def test_refused_by_the_access_rules(start_daemon, tmp_path):
    access = tmp_path / "access.log"
    d = start_daemon(config=config(str(access), more='[access]\ndeny = ["127.0.0.1"]\n'), workers=1)
    with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(5)) as sock:
        assert recv_all(sock) == b""
    found = fields(lines(access)[0])
    assert found["end"] == "refused" and found["cause"] == "denied", found


def test_reopened_on_usr1(start_daemon, tmp_path):
    access = tmp_path / "access.log"
    d = start_daemon(config=config(str(access)), workers=2)
    assert ask(d.port) == NAME_A
    lines(access)
    os.rename(access, tmp_path / "access.log.1")  # what logrotate does
    d.signal(signal.SIGUSR1)
    wait_for(lambda: d.log().count("log file reopened") >= 3, 10, "every process to reopen")
    assert access.exists()  # each worker opened it anew
    assert ask(d.port) == NAME_A
    assert len(lines(access)) == 1 and len((tmp_path / "access.log.1").read_text().splitlines()) == 1


def test_handed_over_on_reload(start_daemon, tmp_path):
    access = tmp_path / "access.log"
    d = start_daemon(config=config(str(access)), workers=1)
    with socket.create_connection(("127.0.0.1", d.port), timeout=scaled(5)) as sock:
        assert ask_on(sock, NAME_Q) == NAME_A
        d.signal(signal.SIGHUP)
        first = fields(lines(access)[0])  # the old worker's line, at the hand-off
        assert first["end"] == "handoff" and first["gen"] == "1" and first["questions"] == "1", first
        assert ask_on(sock, NAME_Q) == NAME_A  # the new worker serves it
    second = fields(lines(access, 2)[1])
    assert second["gen"] == "2" and second["end"] == "client_close" and second["questions"] == "1", second


def test_off_by_default(start_daemon, tmp_path):
    d = start_daemon(workers=1)
    assert ask(d.port) == NAME_A
    assert list(d.tmp.glob("*access*")) == []


def test_check_config_refuses_a_missing_directory(tmp_path):
    path = tmp_path / "lancelotd.toml"
    path.write_text(config(str(tmp_path / "nowhere" / "access.log")))
    result = lancelotd_cli("check-config", "-c", str(path))
    assert result.returncode == 1 and "log.access: directory" in result.stderr, result.stderr
    path.write_text(config("stderr", "xml"))
    result = lancelotd_cli("check-config", "-c", str(path))
    assert result.returncode == 1 and "log.format: must be one of text, json" in result.stderr
