"""What a command run as root may believe of files another user can write (docs/PROMISES.md §6).

The PID file, its start records, the scoreboard and the drain file live in
the runtime directory, which belongs to the service's user (DynamicUser=, or
`user` in classic mode).  Whoever owns that directory can put anything in it:
a symbolic link to /etc/shadow, a FIFO that blocks a reader forever, a PID
file naming a root process.  So root's `lancelotd drain|undrain|stop|reload|
reopen-logs|status`, and the master reading the drain file, go through here:

- the directory is opened by descriptor, walking from /, and must pass the
  runtime directory's rules (runtime.py): not a symbolic link, not writable
  by group or others, every directory above owned by root, by us or by the
  directory's own owner, and sticky where others can write; every later
  access is relative to that descriptor, so what was checked is what is used;
- a file is read only when opened O_NOFOLLOW|O_NONBLOCK (a link fails, a
  FIFO does not block) and fstat() says it is a regular file with one link,
  owned by a uid the caller trusts (root, or the directory's owner);
- a file is written only by creating a fresh one (O_CREAT|O_EXCL|O_NOFOLLOW,
  a random name), fchmod()ing it, and renaming it over the name: a rename
  replaces a planted link, it never writes through it.
Each refusal is an `Untrusted` (an OSError) that says what was refused and why.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat

SHARED = stat.S_IWGRP | stat.S_IWOTH
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Untrusted(OSError):
    """Refused: str() says what and why, in one line."""

    def __init__(self, reason: str, code: int = errno.EPERM) -> None:
        super().__init__(code, reason)

    def __str__(self) -> str:
        return self.strerror or ""


class Directory:
    """A checked directory, held open: every access below is relative to its descriptor."""

    def __init__(self, path: str, fd: int, st: os.stat_result) -> None:
        self.path = path
        self.fd = fd
        self.owner = st.st_uid
        self.group = st.st_gid
        self.mode = stat.S_IMODE(st.st_mode)

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def trusted(self) -> set[int]:
        """Owners whose files we believe: root and the directory's owner (who could write them anyway)."""
        return {0, self.owner}

    def where(self, name: str) -> str:
        return os.path.join(self.path, name)

    def open_file(self, name: str, owners: set[int] | None = None) -> int:
        """A descriptor of regular file `name`, read-only; FileNotFoundError when missing, else Untrusted."""
        owners = self.trusted() if owners is None else owners
        path = self.where(name)
        try:
            fd = os.open(name, READ_FLAGS, dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise Untrusted(f"{path} is a symbolic link: refusing to follow it", errno.ELOOP) from None
            raise
        try:
            judge(os.fstat(fd), path, owners)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read(self, name: str, limit: int = 4096, owners: set[int] | None = None) -> bytes:
        fd = self.open_file(name, owners)
        try:
            return os.read(fd, limit)
        finally:
            os.close(fd)

    def stat(self, name: str, owners: set[int] | None = None) -> os.stat_result | None:
        """lstat() of `name`, judged like a file we read; None when it does not exist."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        judge(st, self.where(name), self.trusted() if owners is None else owners)
        return st

    def replace(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Make `name` hold `data`, atomically: a fresh file, fchmod()ed, renamed over the name."""
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, NEW_FLAGS, 0o600, dir_fd=self.fd)
        try:
            try:
                os.fchmod(fd, mode)  # never chmod() by name: that follows a link
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(tmp)
            raise

    def unlink(self, name: str) -> bool:
        """Remove the name (a link is removed, never followed); False if it was not there."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True


def judge(st: os.stat_result, path: str, owners: set[int]) -> None:
    """Refuse what is not a regular file with one link owned by one of `owners`."""
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a symbolic link" if stat.S_ISLNK(st.st_mode) \
            else "not a regular file"
        raise Untrusted(f"{path} is {kind}: refusing to use it")
    if st.st_uid not in owners:
        names = " or ".join(f"uid {uid}" for uid in sorted(owners))
        raise Untrusted(f"{path} is owned by uid {st.st_uid}, not by {names}: refusing to trust it")
    if st.st_nlink != 1:
        raise Untrusted(f"{path} has {st.st_nlink} hard links: refusing to trust it")


def open_directory(path: str, owners: set[int] | None = None) -> Directory:
    """Open directory `path` if it passes the rules (module docstring).

    `owners`: who may own it (None: anyone, e.g. root looking into the
    service user's directory).  Raises FileNotFoundError when a part is
    missing, PermissionError when we may not enter it, Untrusted otherwise.
    """
    path = os.path.abspath(path)
    names = [name for name in path.split("/") if name]
    fd = os.open("/", DIR_FLAGS)
    chain = [("/", os.fstat(fd))]
    where = "/"
    try:
        for i, name in enumerate(names):
            where = os.path.join(where, name)
            last = i == len(names) - 1
            try:
                child = os.open(name, DIR_FLAGS | (os.O_NOFOLLOW if last else 0), dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and last and _is_link(fd, name):
                    raise Untrusted(f"{where} is a symbolic link: refusing to follow it",
                                    errno.ELOOP) from None
                raise
            os.close(fd)
            fd = child
            chain.append((where, os.fstat(fd)))
        st = chain[-1][1]
        _check(chain, st, owners, euid=os.geteuid())
    except BaseException:
        os.close(fd)
        raise
    return Directory(path, fd, st)


def _check(chain: list[tuple[str, os.stat_result]], st: os.stat_result, owners: set[int] | None,
           euid: int) -> None:
    where = chain[-1][0]
    if owners is not None and st.st_uid not in owners:
        raise Untrusted(f"directory {where} is owned by uid {st.st_uid}, not by "
                        + " or ".join(f"uid {uid}" for uid in sorted(owners)) + ": refusing to use it")
    if st.st_mode & SHARED:
        mode = stat.S_IMODE(st.st_mode)
        raise Untrusted(f"directory {where} is writable by group or others (mode {mode:04o}): "
                        "anyone could plant files there; refusing to use it")
    for above, ast in chain[:-1]:
        if ast.st_uid not in (0, euid, st.st_uid):
            raise Untrusted(f"directory {above} is owned by uid {ast.st_uid}, neither root nor the owner "
                            f"of {where}: refusing to use what it holds")
        if ast.st_mode & SHARED and not ast.st_mode & stat.S_ISVTX:
            raise Untrusted(f"directory {above} is writable by others and not sticky: "
                            "refusing to use what it holds")


def _is_link(fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def describe_denied(path: str) -> str:
    """Why an ordinary user cannot read `path`: the directory that keeps it out, with owner and mode."""
    where = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(where)
    except OSError:
        return f"permission denied on {path}"
    return (f"permission denied: {where} is mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}, "
            f"group gid {st.st_gid} (it holds the clients' addresses): run this as root, as that user, "
            "or as a member of that group")
