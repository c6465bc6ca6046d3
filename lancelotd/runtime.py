"""The runtime directory that holds the PID file and the scoreboard (docs/PROMISES.md §3).

On a machine where lancelotd never ran the directory does not exist yet:
/run/lancelotd for root, $XDG_RUNTIME_DIR/lancelotd for a user, else
/tmp/lancelotd-UID/lancelotd.  `ensure_directory` creates what is missing
and refuses a directory that someone else could change under us, because
whoever can rename or replace it can make the master write its PID file or
scoreboard wherever they like, or make `lancelotd stop` signal another process.

The rules, walking from / down to the directory:
- every directory on the way must be owned by root or by us, and one that
  others can write to must be sticky (as /tmp is): only then can nobody else
  rename what it holds;
- the directory itself, every directory we create, and every directory that
  sits in one others can write to (/tmp/lancelotd-UID) must be a real
  directory (never a symbolic link), owned by us and not writable by group
  or others.
The walk goes through directory descriptors (openat), so what is checked is
what is used.  Symbolic links above that point (/var/run -> /run) are fine.
"""

from __future__ import annotations

import errno
import os
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
SHARED = stat.S_IWGRP | stat.S_IWOTH
# (uid, gid) of the workers' user when a root master runs them as another (privileges.py): the
# runtime directory is theirs (they bind their hand-off inboxes in it), and counts as "ours".
SERVICE_OWNER: tuple[int, int] | None = None
DEFAULT_ROOT_DIR = "/run/lancelotd"


class RuntimeDirError(OSError):
    """The runtime directory cannot be used; str() and .strerror give the one-line reason.

    An OSError, so a caller that reports "cannot use PID file X: {strerror}"
    for other OSErrors says the right thing for this one too.
    """

    def __init__(self, reason: str, code: int = errno.EPERM) -> None:
        super().__init__(code, reason)

    def __str__(self) -> str:
        return self.strerror or ""


def directory_mode() -> int:
    """0750 for root (its group may read the PID file; the scoreboard holds addresses), 0700 for a user."""
    return 0o750 if os.geteuid() == 0 else 0o700


def ensure_directory(path: str, mode: int | None = None) -> None:
    """Make `path` a directory only we can change, creating missing parts with `mode`.

    Raises RuntimeDirError saying which directory is wrong and why.
    """
    mode = directory_mode() if mode is None else mode
    names = [name for name in os.path.abspath(path).split("/") if name]
    fd = os.open("/", DIR_FLAGS)
    where = "/"
    try:
        parent = os.fstat(fd)
        for i, name in enumerate(names):
            _check_ancestor(parent, where)
            where = os.path.join(where, name)
            private = i == len(names) - 1 or bool(parent.st_mode & SHARED)
            child, created = _open_or_create(fd, name, where, mode, private)
            os.close(fd)
            fd = child
            parent = os.fstat(fd)
            if private or created:
                _check_private(parent, where)
            if created and stat.S_IMODE(parent.st_mode) != mode:
                os.fchmod(fd, mode)  # the umask may have taken bits we want (0755 for root)
            if i == len(names) - 1:
                _give_to_service(fd, parent, created or where == DEFAULT_ROOT_DIR)
    except RuntimeDirError:
        raise
    except OSError as e:
        raise RuntimeDirError(f"cannot use directory {where}: {e.strerror}", e.errno) from None
    finally:
        os.close(fd)


def _give_to_service(fd: int, st: os.stat_result, ours_to_give: bool) -> None:
    """The runtime directory to the workers' user: one we made now, or the default one, only.

    Never an existing directory of root's that the PID file was merely put in (/run itself):
    there the workers bind no inbox, and retiring ones drain instead of handing over.
    """
    if SERVICE_OWNER is not None and ours_to_give and st.st_uid == os.geteuid() != SERVICE_OWNER[0]:
        os.fchown(fd, *SERVICE_OWNER)


def owners() -> set[int]:
    """Who may own what the runtime directory holds, for us: root, us, and the workers' user."""
    return {0, os.geteuid(), *(SERVICE_OWNER[:1] if SERVICE_OWNER else ())}


def _check_ancestor(st: os.stat_result, where: str) -> None:
    if st.st_uid not in (0, os.geteuid()):
        raise RuntimeDirError(f"directory {where} is owned by uid {st.st_uid}, neither root nor us "
                              f"(uid {os.geteuid()}): refusing to use what it holds")
    if st.st_mode & SHARED and not st.st_mode & stat.S_ISVTX:
        raise RuntimeDirError(f"directory {where} is writable by others and not sticky: "
                              "refusing to use what it holds")


def _check_private(st: os.stat_result, where: str) -> None:
    if st.st_uid not in (os.geteuid(), SERVICE_OWNER and SERVICE_OWNER[0]):
        raise RuntimeDirError(f"directory {where} is owned by uid {st.st_uid}, not by us "
                              f"(uid {os.geteuid()}): refusing to use it")
    if st.st_mode & SHARED:
        raise RuntimeDirError(f"directory {where} is writable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing to use it; "
                              "chmod go-w it or remove it")


def _open_or_create(fd: int, name: str, where: str, mode: int, private: bool) -> tuple[int, bool]:
    """A descriptor of directory `name` in `fd`, and whether we made it."""
    flags = DIR_FLAGS | (os.O_NOFOLLOW if private else 0)
    try:
        return os.open(name, flags, dir_fd=fd), False
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        raise _not_a_directory(fd, name, where) from None
    try:
        os.mkdir(name, mode, dir_fd=fd)
    except FileExistsError:  # made by someone else meanwhile: check it as one we did not make
        return _open_or_create(fd, name, where, mode, True)[0], False
    try:
        return os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd), True
    except NotADirectoryError:  # replaced between mkdir and open
        raise _not_a_directory(fd, name, where) from None


def _not_a_directory(fd: int, name: str, where: str) -> RuntimeDirError:
    try:
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        is_link = False
    if is_link:
        return RuntimeDirError(f"{where} is a symbolic link: refusing to follow it; remove it", errno.ELOOP)
    return RuntimeDirError(f"{where} is not a directory", errno.ENOTDIR)


def open_new_file(path: str, flags: int, mode: int = 0o644) -> int:
    """Create `path` afresh and open it: never through a symbolic link, never an existing file.

    For temporary files that are renamed into place.  A leftover of our own
    (a crash after creating it, the PID reused since) is removed first.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, flags | NEW_FILE_FLAGS, mode)
