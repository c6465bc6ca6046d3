"""`lancelotd status`: what every process is doing, from the PID file alone.

The PID file names the master; the scoreboard beside it holds what the
workers publish; psutil adds CPU and memory; /proc/net/tcp gives each
listening socket's accept-queue depth.  Exit codes follow LSB:
0 running, 1 dead but PID file exists, 3 not running, 4 unknown.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

import psutil

from . import pidfile, trust
from .agent import AGENT_DRAIN, AGENT_READY, BALANCE_NAMES, READY
from .scoreboard import STATE_NAMES, Counters, Scoreboard, ScoreboardError
from .scoreboard import path_for as scoreboard_path
from .sockets import format_address

RUNNING, DEAD, NOT_RUNNING, UNKNOWN = 0, 1, 3, 4
SCHEMA = 1
ERROR_KINDS = ("unknown", "too_long", "not_ascii", "timeouts")
REFUSAL_CAUSES = ("denied", "per_client_limit", "denied_open")  # access.py
PROXY_COUNTERS = {"local": "proxy_local", "invalid": "proxy_invalid", "untrusted": "proxy_untrusted",
                  "timeout": "proxy_timeout"}  # PROXY protocol listeners (proxied.py)
GROUPED = (*ERROR_KINDS, *REFUSAL_CAUSES, *PROXY_COUNTERS.values())


class StatusError(Exception):
    """Why no master can be shown; `denied`: the caller may not read what it needs (refusals.py)."""

    def __init__(self, code: int, message: str, denied: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.denied = denied


def explain(e: StatusError, command: str, pid: int | None = None) -> str:
    """The error's line for `command`, with what to run instead when it was a refusal."""
    from .refusals import instead

    return f"lancelotd: {e}" + (f": {instead(command, pid)}" if e.denied else "")


def find_master(pid_file: str) -> tuple[psutil.Process, Scoreboard]:
    """The live master and its own scoreboard, or StatusError saying what is wrong."""
    proc = find_master_process(pid_file)
    path = scoreboard_path(pid_file)
    try:
        board = Scoreboard.open(path, owners={0, proc.uids().effective})
        owner = board.read_header().master_pid
    except PermissionError:
        raise StatusError(UNKNOWN, f"master {proc.pid} is running, but its scoreboard is not for us to read: "
                          f"{trust.describe_denied(path)}", denied=True) from None
    except (OSError, ValueError, psutil.Error) as e:
        raise StatusError(UNKNOWN, f"master {proc.pid} is running but its scoreboard is unreadable: {e}"
                          ) from None
    if owner != proc.pid:  # e.g. left by a USR2 successor that died before it wrote the PID file
        board.close()
        raise StatusError(UNKNOWN, f"master {proc.pid} is running but the scoreboard {path} is master "
                                   f"{owner}'s, not its own: what it shows would not be this master's")
    return proc, board


def find_master_process(pid_file: str) -> psutil.Process:
    """The live master the PID file names, or StatusError.

    Without its scoreboard: enough to signal it, so `stop` works on a master
    whose scoreboard this code cannot read (another layout, after an upgrade).
    """
    try:
        proc, pid, why = pidfile.examine(pid_file)
    except FileNotFoundError:
        raise StatusError(NOT_RUNNING, f"not running (no PID file {pid_file})") from None
    except PermissionError:
        raise StatusError(UNKNOWN, f"cannot read PID file {pid_file}: {trust.describe_denied(pid_file)}",
                          denied=True) from None
    except trust.Untrusted as e:
        raise StatusError(UNKNOWN, f"refused: {e}") from None
    except OSError as e:
        raise StatusError(UNKNOWN, f"cannot read PID file {pid_file}: {e.strerror}") from None
    if proc is None:
        if pid is None:
            raise StatusError(UNKNOWN, f"PID file {pid_file} does not hold a PID")
        code = DEAD if why in pidfile.STALE else UNKNOWN
        raise StatusError(code, f"{'dead' if code == DEAD else 'refused'}: PID file {pid_file} names PID "
                                f"{pid}, {why}" + (" (stale)" if code == DEAD else ""))
    return proc


def snapshot(proc: psutil.Process, board: Scoreboard) -> dict[str, Any]:
    """Everything `status` shows, as plain data (the --json schema, documented in the README)."""
    header, message = board.read_reload_result()
    now_wall, now_mono = time.time(), time.monotonic()
    workers = []
    slots = [slot for _, slot in board.slots()]  # one reading, for the rows and the totals
    for slot in slots:
        counters = slot.counters or Counters()
        workers.append({
            "pid": slot.pid, "number": slot.number, "generation": slot.generation,
            "state": STATE_NAMES.get(slot.state, "?"),
            "uptime_s": round(now_wall - slot.started, 1) if slot.started else 0.0,
            "heartbeat_age_s": round(now_mono - slot.heartbeat, 2) if slot.heartbeat else None,
            "connections": slot.connections,
            "answered_per_s": round(slot.rate, 1),
            **process_figures(slot.pid),
            "answered": counters.answered, "accepted": counters.accepted,
            "errors": {kind: getattr(counters, kind) for kind in ERROR_KINDS},
            "refused": {cause: getattr(counters, cause) for cause in REFUSAL_CAUSES},
            "proxy": {name: getattr(counters, field) for name, field in PROXY_COUNTERS.items()},
            "bytes_in": counters.bytes_in, "bytes_out": counters.bytes_out,
            "recent_clients": [format_address(address) for address in slot.clients],
        })
    workers.sort(key=lambda w: (w["generation"], w["number"]))
    totals = board.totals(slots)
    found = listeners(proc, header.metrics_port, header.agent_port)
    hidden = {} if found is not None else {"listeners_hidden": f"not allowed to read /proc/{proc.pid}/fd: "
                                                               "run as root or as the master's user"}
    answered_per_s = round(sum(w["answered_per_s"] for w in workers if w["state"] != "free"), 1)
    return {
        "schema": SCHEMA,
        "state": "running",
        "time": now_wall,
        "master": {
            "pid": proc.pid, "generation": header.generation, "workers_target": header.workers_target,
            "uptime_s": round(now_wall - header.started, 1), "title": " ".join(proc.cmdline()).strip(),
            **process_figures(proc.pid),
        },
        "listeners": found or [],
        **hidden,
        "balancer": {
            "state": BALANCE_NAMES.get(header.balance, "?"), "drained": bool(header.drained),
            "agent": (AGENT_READY if header.balance == READY else AGENT_DRAIN).decode().strip(),
        },
        "reloads": {
            "count": header.reloads, "failures": header.reload_failures,
            "last": header.last_reload or None, "last_ok": bool(header.last_reload_ok),
            "last_message": message, "pending": bool(header.reload_pending),
        },
        "replaced": {"crashed": header.replaced_crashed, "hung": header.replaced_hung,
                     "recycled": header.recycled},
        "workers": workers,
        "totals": {
            "connections": sum(w["connections"] for w in workers),
            "answered_per_s": answered_per_s,
            **{k: v for k, v in asdict(totals).items() if k not in GROUPED},
            "errors": {kind: getattr(totals, kind) for kind in ERROR_KINDS},
            "refused": {cause: getattr(totals, cause) for cause in REFUSAL_CAUSES},
            "proxy": {name: getattr(totals, field) for name, field in PROXY_COUNTERS.items()},
        },
    }


def process_figures(pid: int) -> dict[str, Any]:
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            times = proc.cpu_times()
            mem = proc.memory_full_info()
            return {"cpu_seconds": round(times.user + times.system, 2), "rss": mem.rss, "uss": mem.uss}
    except (psutil.Error, OSError):
        return {"cpu_seconds": None, "rss": None, "uss": None}


def listeners(proc: psutil.Process, metrics_port: int, agent_port: int = 0) -> list[dict[str, Any]] | None:
    """The master's listening TCP sockets with their role and accept-queue depth; None when the
    caller may not see the master's descriptors (another user's process)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{proc.pid}/fd"):
            target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except PermissionError:
        return None
    except OSError:
        return []
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A = LISTEN
                continue
            # For a listening socket the kernel reports its accept queue as rx_queue.
            rx_queue = int(fields[4].split(":")[1], 16)
            address = decode_address(fields[1], v6)
            port = int(fields[1].rsplit(":", 1)[1], 16)
            role = {metrics_port: "metrics", agent_port: "agent"}.get(port, "service") if port else "service"
            found.append({"address": address, "role": role, "accept_queue": rx_queue})
    return found + unix_listeners(inodes)


def unix_listeners(inodes: set[str]) -> list[dict[str, Any]]:
    """The master's listening UNIX sockets (/proc/net/unix: flag __SO_ACCEPTCON); the kernel does
    not show their accept queue there (null)."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.readlines()[1:]
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(None, 7)  # Num RefCount Protocol Flags Type St Inode Path
        if len(fields) == 8 and fields[6] in inodes and int(fields[3], 16) & 0x10000:
            found.append({"address": "unix:" + fields[7].strip(), "role": "service", "accept_queue": None})
    return found


def decode_address(hex_address: str, v6: bool) -> str:
    import ipaddress

    host_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(host_hex)
    if v6:  # four little-endian 32-bit words
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return f"[{ipaddress.IPv6Address(raw)}]:{int(port_hex, 16)}"
    return f"{ipaddress.IPv4Address(raw[::-1])}:{int(port_hex, 16)}"


def add_cpu(current: dict[str, Any], previous: dict[str, Any]) -> None:
    """CPU % of each process over the interval between two snapshots."""
    elapsed = current["time"] - previous["time"]
    before = {w["pid"]: w for w in previous["workers"]}
    for worker in current["workers"]:
        old = before.get(worker["pid"])
        worker["cpu_percent"] = rate(worker["cpu_seconds"], old and old["cpu_seconds"], elapsed, 100)
    master, old_master = current["master"], previous["master"]
    master["cpu_percent"] = rate(master["cpu_seconds"], old_master["cpu_seconds"], elapsed, 100)
    current["interval_s"] = round(elapsed, 3)


def rate(now: float | None, before: float | None, elapsed: float, scale: float = 1.0) -> float | None:
    if now is None or before is None or elapsed <= 0:
        return None
    return round((now - before) * scale / elapsed, 1)


# --- human output -----------------------------------------------------------

def human(snap: dict[str, Any]) -> str:
    m, r, rep, t = snap["master"], snap["reloads"], snap["replaced"], snap["totals"]
    last = "never"
    if r["last"]:
        last = f"{'ok' if r['last_ok'] else 'FAILED'} {duration(time.time() - r['last'])} ago"
        if not r["last_ok"]:
            last += f": {r['last_message']}"
    lines = [
        f"lancelotd running: master {m['pid']}, up {duration(m['uptime_s'])}, generation {m['generation']}, "
        f"{m['workers_target']} workers wanted",
        f"  {m['title']}",
        "  listening: " + (", ".join(
            f"{listener['address']} (accept queue {listener['accept_queue']})"
            if listener["role"] == "service" and listener["accept_queue"] is not None
            else f"{listener['address']} ({listener['role']})"
            for listener in snap["listeners"]) or (f"? ({snap['listeners_hidden']})"
                                                    if "listeners_hidden" in snap else "-")),
        "  balancer: " + balancer_line(snap["balancer"]),
        f"  reloads: {r['count']} ({r['failures']} failed), last {last}"
        + (" - reload under way" if r["pending"] else ""),
        f"  workers replaced: {rep['crashed']} crashed, {rep['hung']} hung, {rep['recycled']} recycled",
        "",
    ]
    header = ("ROLE", "PID", "GEN", "STATE", "UPTIME", "CPU%", "RSS", "USS", "CONNS", "ANSWERED", "ANS/S")
    rows = [header, ("master", m["pid"], m["generation"], "-", duration(m["uptime_s"]),
                     num(m.get("cpu_percent")), size(m["rss"]), size(m["uss"]), "-", "-", "-")]
    for w in snap["workers"]:
        rows.append((f"worker {w['number']}", w["pid"], w["generation"], w["state"], duration(w["uptime_s"]),
                     num(w.get("cpu_percent")), size(w["rss"]), size(w["uss"]), w["connections"],
                     w["answered"], num(w.get("answered_per_s"))))
    rows.append(("total", "", "", "", "", "", "", "", t["connections"], t["answered"],
                 num(t.get("answered_per_s"))))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [str(c).ljust(widths[i]) if i < 4 else str(c).rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    e = t["errors"]
    lines.append(f"errors: {e['unknown']} unknown questions, {e['too_long']} too long, "
                 f"{e['not_ascii']} non-ASCII, {e['timeouts']} idle timeouts; {t['accepted']} connections "
                 f"accepted, {size(t['bytes_in'])} in, {size(t['bytes_out'])} out")
    f = t["refused"]
    lines.append(f"refused: {f['denied']} denied, {f['per_client_limit']} over max_connections_per_client; "
                 f"{f['denied_open']} open connections closed as a reload's rules deny them")
    p = t["proxy"]
    if any(p.values()):
        lines.append(f"PROXY protocol: {p['local']} health checks (LOCAL); closed: {p['invalid']} invalid "
                     f"headers, {p['untrusted']} untrusted sources, {p['timeout']} header timeouts")
    return "\n".join(lines)


def balancer_line(b: dict[str, Any]) -> str:
    line = {"ready": "ready", "drained": "DRAINED by the operator (`lancelotd undrain` ends it)",
            "stopping": "stopping", "not_serving": "no worker serving yet"}.get(b["state"], b["state"])
    if b["drained"] and b["state"] != "drained":
        line += ", drained by the operator"
    return f"{line} (agent says: {b['agent']})"


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(value)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"



# --- the command ------------------------------------------------------------

def run(pid_file: str, as_json: bool, watch: float | None, interval: float = 0.5) -> int:
    try:
        proc, board = find_master(pid_file)
    except StatusError as e:
        if as_json:
            print(json.dumps({"schema": SCHEMA, "state": state_name(e.code), "problem": str(e),
                              "pid_file": pid_file}))
        else:
            print(explain(e, "status"), file=sys.stderr)
        return e.code
    previous = None
    try:
        while True:
            try:
                snap = snapshot(proc, board)
            except psutil.NoSuchProcess:
                print("lancelotd: the master exited", file=sys.stderr)
                return DEAD
            except ScoreboardError as e:
                print(f"lancelotd: {e}", file=sys.stderr)
                return UNKNOWN
            if previous is None:
                previous = snap
                time.sleep(interval)  # CPU % is measured over a short interval
                continue
            add_cpu(snap, previous)
            snap["pid_file"] = pid_file
            text = json.dumps(snap, indent=None if watch else 2) if as_json else human(snap)
            if watch and not as_json:
                sys.stdout.write("\x1b[H\x1b[2J")  # refresh in place
            print(text, flush=True)
            if not watch:
                return RUNNING
            previous = snap
            time.sleep(watch)
    except KeyboardInterrupt:
        return RUNNING


def state_name(code: int) -> str:
    return {RUNNING: "running", DEAD: "dead", NOT_RUNNING: "stopped", UNKNOWN: "unknown"}[code]
