"""What the `lancelotd` commands say when they cannot do their job: one line, never a traceback.

Two causes the commands that look for the master (status, reload, stop, reopen-logs, drain,
undrain) must not confuse with "not running":
- the config named by -c (or $LANCELOTD_CONFIG, or the installed one) is invalid, so the PID
  file's path is unknown: exit NOT_CONFIGURED (6, LSB "program is not configured");
- the caller may not read a file or signal the master: exit NO_PRIVILEGE (4, LSB "user had
  insufficient privilege"), naming what was refused and what to run instead.
"""

from __future__ import annotations

import os
import pwd
import signal

import psutil

NO_PRIVILEGE = 4  # LSB init-script actions: "user had insufficient privilege"
NOT_CONFIGURED = 6  # LSB: "program is not configured"
SYSTEMCTL = {"reload": "systemctl reload lancelotd", "stop": "systemctl stop lancelotd",
             "status": "systemctl status lancelotd",
             "reopen-logs": "systemctl kill --kill-whom=main -s USR1 lancelotd"}


class NotConfigured(Exception):
    """The config could not be read: the PID file's path (and the rest) is unknown."""

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__(f"{path}: " + "; ".join(problems))
        self.path = path
        self.problems = problems


def not_configured_lines(e: NotConfigured) -> list[str]:
    return [f"lancelotd: {e.path}: {problem}" for problem in e.problems] + [
        "lancelotd: the config is invalid, so where the master is (its PID file) is unknown: fix it "
        "(lancelotd check-config), or give --pid-file"]


def unit_of(pid: int) -> str:
    """The systemd service `pid` runs in ("" if none, or unknown): /proc/PID/cgroup is world-readable."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    for part in reversed(text.strip().rpartition(":")[2].split("/")):
        if part.endswith(".service"):
            return part
    return ""


def user_of(pid: int) -> str:
    try:
        uid = psutil.Process(pid).uids().real
        return pwd.getpwuid(uid).pw_name
    except (psutil.Error, KeyError, OSError):
        return "another user"


def instead(command: str, pid: int | None) -> str:
    """What to run instead, as one phrase: systemctl when the master is a systemd service."""
    unit = unit_of(pid) if pid else ""
    if unit and command in SYSTEMCTL:
        return f"run `{SYSTEMCTL[command].replace('lancelotd', unit.removesuffix('.service'))}`"
    owner = user_of(pid) if pid else "root"
    return f"run `sudo lancelotd {command} ...`" + ("" if owner == "root" else f" (or as the user {owner})")


def cannot_signal(command: str, pid: int, signame: str) -> str:
    me = pwd.getpwuid(os.geteuid()).pw_name if _known(os.geteuid()) else str(os.geteuid())
    return (f"lancelotd: {command}: not allowed to send {signame} to master {pid} (it runs as "
            f"{user_of(pid)}, you are {me}): {instead(command, pid)}")


def cannot_read(command: str, what: str, pid: int | None = None) -> str:
    return f"lancelotd: {command}: not allowed to read {what}: {instead(command, pid)}"


def _known(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


class Refused(Exception):
    """A command cannot go on; the message is its one line, `code` its exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def send(command: str, proc: psutil.Process, sig: signal.Signals) -> None:
    """Signal the master, or Refused saying why not (another user's master; gone meanwhile)."""
    try:
        proc.send_signal(sig)
    except (psutil.AccessDenied, PermissionError):
        raise Refused(cannot_signal(command, proc.pid, sig.name), NO_PRIVILEGE) from None
    except psutil.NoSuchProcess:
        raise Refused(f"lancelotd: {command}: master {proc.pid} exited before {sig.name} reached it",
                      1) from None
