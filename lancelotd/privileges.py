"""`user` and `group`: a master started as root runs its workers unprivileged (docs/PROMISES.md §3).

As nginx (`user`), php-fpm (`user`/`group`) and gunicorn (`--user`/`--group`) do.
The master keeps root, as nginx's does: a reload may bind a new privileged
port, USR1 reopens a log file in a root-owned directory, and the PID file
and scoreboard are written where only root may; it serves no client and
reads nothing a client sends.  Each worker, right after the fork and before
it touches a client socket, sets its supplementary groups (initgroups: the
user's groups), then its real, effective and saved gid, then its real,
effective and saved uid (setresgid before setresuid: after the uid no gid
can be changed), and checks that root cannot be had back.

Shared files are made so both can use them: the runtime directory belongs
to the user (the workers bind their hand-off inboxes there, and nobody else
may write it: runtime.py), the scoreboard is root's with the group's read
bit (0640), the log file is the user's (the workers reopen it on USR1).
Under systemd the unit's DynamicUser= stays the default: there the master
itself is unprivileged and `user` is refused.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from functools import lru_cache

from . import runtime


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]


class PrivilegeError(Exception):
    """Why the workers cannot run as the configured user; one line."""


def user_problem(name: str) -> str | None:
    """None if `name` is "" or a user this system knows, else the reason (for check-config)."""
    if name == "":
        return None
    try:
        _user(name)
    except KeyError:
        return f"no such user {name!r} on this system"
    return None


def group_problem(name: str) -> str | None:
    if name == "":
        return None
    try:
        _group(name)
    except KeyError:
        return f"no such group {name!r} on this system"
    return None


def _user(name: str) -> pwd.struct_passwd:
    return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)


def _group(name: str) -> int:
    return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid


@lru_cache(maxsize=8)
def resolve(user: str, group: str) -> Identity | None:
    """The identity `user`/`group` name, None when neither is set; PrivilegeError says why not."""
    if not user:
        if group:
            raise PrivilegeError(f"group = {group!r} needs user too: the workers' user and its group")
        return None
    try:
        entry = _user(user)
    except KeyError:
        raise PrivilegeError(f"user {user!r}: no such user on this system") from None
    try:
        gid = _group(group) if group else entry.pw_gid
    except KeyError:
        raise PrivilegeError(f"group {group!r}: no such group on this system") from None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid))))
    return Identity(entry.pw_name, entry.pw_uid, gid, groups)


def prepare(user: str, group: str) -> Identity | None:
    """At start, in the master: resolve, check we may switch to it, and make it the runtime owner.

    PrivilegeError when the user or group does not exist, or when we are not
    root (only root can give its workers another identity).
    """
    identity = resolve(user, group)
    if identity is None:
        return None
    if os.geteuid() != 0 and (identity.uid, identity.gid) != (os.geteuid(), os.getegid()):
        raise PrivilegeError(f"user {identity.user!r}: only a master started as root can run its workers "
                             f"as another user (this one runs as uid {os.geteuid()}); under systemd "
                             "DynamicUser= does it: leave user and group unset")
    if identity.uid != os.geteuid():
        runtime.SERVICE_OWNER = (identity.uid, identity.gid)
    return identity


def drop(identity: Identity) -> None:
    """In a forked worker: become `identity` for good (groups, gids, then uids); OSError if it fails."""
    if identity.uid == os.geteuid() and identity.gid == os.getegid():
        return
    os.setgroups(list(identity.groups))
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    if identity.uid != 0:
        try:
            os.setresuid(0, 0, 0)
        except PermissionError:
            return
        raise PermissionError("root could be had back after dropping privileges")
