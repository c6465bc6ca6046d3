"""Listening sockets: address parsing, binding, and naming them in logs."""

from __future__ import annotations

import _socket
import ctypes
import os
import shutil
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import activation
from .activation import ACTIVATED
from .logs import log

if TYPE_CHECKING:
    from .config import Config

__all__ = ["ACTIVATED"]  # re-exported: the listeners' keys are built here

# Classic BPF over the TCP header, for refuse_new_connections(): ldb [13]
# (the flags); and #0x12 (SYN|ACK); jeq #0x02 (a SYN alone) -> drop; else pass.
SO_ATTACH_FILTER = 26
_DROP_SYN = [(0x30, 0, 0, 13), (0x54, 0, 0, 0x12), (0x15, 0, 1, 0x02),
             (0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF)]
_DROP_SYN_CODE = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in _DROP_SYN))


def acceptor(listener: socket.socket) -> Callable[[], tuple[_socket.socket, Any]]:
    """`listener.accept()` for the hot path: a non-blocking connection as a plain `_socket.socket`.

    socket.socket's Python layer (enum conversions of family and type on
    every accept, a Python-level close) costs 3-5 us per connection, a tenth
    of a worker's CPU per connect-per-request client.  The C object has every
    method a connection needs (recv, send, close, shutdown, fileno, detach).
    """
    take = listener._accept  # (fd, address): accept4() with SOCK_CLOEXEC, no Python socket built
    family = int(listener.family)

    def accept() -> tuple[_socket.socket, Any]:
        fd, address = take()
        try:
            sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
        except OSError:  # the descriptor is ours until a socket object owns it
            os.close(fd)
            raise
        try:
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock, address
    return accept


class BindError(Exception):
    """A configured address could not be bound; the message names it."""


UNIX = "unix:"  # a UNIX-socket listener's address: "unix:/run/lancelotd/lancelotd.sock"
SUN_PATH = 107  # bytes of a path sockaddr_un holds, its NUL aside
UNIX_MODE = 0o660  # a UNIX socket's default mode, as php-fpm's listen.mode


def unix_path(address: str) -> str | None:
    """The path of a "unix:PATH" address, None for a TCP one; ValueError if the path is unusable."""
    if not address.startswith(UNIX):
        return None
    path = address[len(UNIX):]
    if not path.startswith("/"):
        raise ValueError(f"{address!r}: a UNIX socket's path must be absolute (unix:/run/lancelotd/x.sock)")
    if len(os.fsencode(path)) > SUN_PATH or "," in path or "\0" in path:
        raise ValueError(f"{address!r}: a UNIX socket's path holds at most {SUN_PATH} bytes, no ',' or NUL")
    return path


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT' or ':PORT' (all IPv4 interfaces) -> (host, port); 'unix:PATH' -> (PATH, 0)."""
    path = unix_path(address)
    if path is not None:
        return path, 0
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (port 0-65535; IPv6 as [::1]:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, e.g. [::1]:1060")
    return host or "0.0.0.0", int(port)


MAPPED = "::ffff:"  # an IPv4 client of a dual-stack [::] listener: named and judged by its IPv4 address


def unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as its IPv4 address; any other as it is."""
    return host[len(MAPPED):] if host.startswith(MAPPED) and "." in host else host


def format_address(sockaddr: tuple | str | bytes) -> str:
    if isinstance(sockaddr, (str, bytes)):  # AF_UNIX
        return UNIX + os.fsdecode(sockaddr)
    host, port = unmapped(sockaddr[0]), sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe(sockaddr: object) -> str:
    """A client's address for a log line ("?" when unknown)."""
    return format_address(sockaddr) if isinstance(sockaddr, tuple) and len(sockaddr) >= 2 else "?"


def pack_address(sockaddr: tuple | None) -> tuple[int, bytes, int]:
    """A client's address in fixed size, for the scoreboard and the hand-off:
    (4 or 6, 16 bytes, port), or (0, zeros, 0) for none (or not an IP address)."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2 and isinstance(sockaddr[0], str):
        host = unmapped(sockaddr[0])
        try:
            if ":" in host:
                return 6, socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), sockaddr[1]
            return 4, socket.inet_pton(socket.AF_INET, host).ljust(16, b"\0"), sockaddr[1]
        except OSError:
            pass
    return 0, bytes(16), 0


def unpack_address(family: int, raw: bytes, port: int) -> tuple | None:
    """pack_address() undone: a socket-module address ((host, port), IPv6 (host, port, 0, 0)), or None."""
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[:4]), port
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, raw[:16]), port, 0, 0
    return None


@dataclass(frozen=True)
class UnixOptions:
    """A UNIX socket's file: its mode, and owner and group ("" = the process's)."""

    mode: int = UNIX_MODE
    owner: str = ""
    group: str = ""


def bind_unix(path: str, backlog: int, options: UnixOptions) -> socket.socket:
    """A listening UNIX socket at `path`, its file given options' mode, owner and group.

    A socket file left by a dead master (nobody accepts on it: connect() is refused) is
    replaced; one a live process listens on is refused, as is any other kind of file.
    """
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise BindError(f"cannot bind unix:{path}: a live process listens on it")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # stale: its listener is gone
            finally:
                probe.close()
        else:
            raise BindError(f"cannot bind unix:{path}: it exists and is not a socket")
    except FileNotFoundError:
        pass
    except OSError as e:
        raise BindError(f"cannot bind unix:{path}: {e.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        try:
            os.chmod(path, options.mode)
            if options.owner or options.group:
                owner, group = (int(x) if x.isdigit() else (x or None)
                                for x in (options.owner, options.group))
                shutil.chown(path, owner, group)  # names, or numbers
            sock.listen(backlog)
        except (OSError, LookupError) as e:
            os.unlink(path)
            raise BindError(f"cannot set up unix:{path}: {getattr(e, 'strerror', None) or e}") from None
    except OSError as e:
        sock.close()
        raise BindError(f"cannot bind unix:{path}: {e.strerror}") from None
    except BindError:
        sock.close()
        raise
    return sock


def bind(address: str, backlog: int, unix: UnixOptions | None = None) -> socket.socket:
    """A listening socket for `address`, inheritable by forked workers only.

    The socket stays blocking: workers watch it with EPOLLEXCLUSIVE and accept
    non-blockingly with accept4 flags, never with settimeout(), which would
    turn every accept into poll+accept and wake all workers at once.
    """
    path = unix_path(address)
    if path is not None:
        return bind_unix(path, backlog, unix or UnixOptions())
    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BindError(f"cannot bind {address}: {e.strerror}") from None
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::] and 0.0.0.0 on one port are two sockets, as operators expect.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise BindError(f"cannot bind {address}: {e.strerror}") from None
    except OverflowError:  # config bounds backlog; this is for callers that do not check it
        sock.close()
        raise BindError(f"cannot listen on {address}: backlog {backlog} is too large") from None
    return sock


# The kernel's send buffer of a connection (it doubles the figure for its own
# bookkeeping).  Left to autotuning it grows to tcp_wmem's maximum (4 MB): a
# client that never reads would make us answer 4 MB of questions and hold them.
SEND_BUFFER = 65536


def bound_send_buffers(listeners: list[socket.socket]) -> None:
    """Accepted sockets inherit the listener's SO_SNDBUF when their handshake completes: set it
    on the listener as soon as the master has it (before any worker serves), not per accept."""
    for sock in listeners:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError as e:  # serve on with the kernel's default
            log.warning("cannot bound the send buffer of %s: %s", format_address(sock.getsockname()),
                        e.strerror)


def open_listeners(cfg: Config, existing: dict[str, socket.socket]) -> dict[str, socket.socket]:
    """Sockets for cfg.addresses (bind, [[listener]]): existing ones reused (queues survive), the rest bound.

    A socket from socket activation serves the configured address it is bound to
    (activation.py); one that no address names is kept too (systemd holds it:
    clients connect there) and served with the defaults, with a warning.  On
    failure the sockets bound here are closed and `existing` is untouched.
    """
    activated = [key for key in existing if key.startswith(ACTIVATED)]
    matched, unnamed = activation.match([a for a in cfg.addresses if a not in existing], activated)
    listeners: dict[str, socket.socket] = {}
    proxied = {listener.bind for listener in cfg.listeners if listener.proxy_protocol}
    unix = {x.bind: UnixOptions(x.mode, x.owner, x.group) for x in cfg.listeners}
    try:
        for address in cfg.addresses:
            key = address if address in existing else matched.get(address)
            if key is not None:
                listeners[key] = existing[key]
                if address in proxied and key != address:
                    log.info("socket-activated %s is %s (PROXY protocol v2)",
                             key.removeprefix(ACTIVATED), address)
                continue
            sock = bind_beside(address, cfg.backlog, activated, unix.get(address))
            log.info("listening on %s%s", format_address(sock.getsockname()),
                     " (PROXY protocol v2)" if address in proxied else "")
            listeners[address] = sock
    except BindError:
        for address, sock in listeners.items():
            if existing.get(address) is not sock:
                sock.close()
        raise
    for key in unnamed:
        log.warning("%s", activation.unnamed_warning(key))
        listeners[key] = existing[key]
    bound_send_buffers(list(listeners.values()))  # inherited and activated ones too
    return listeners


def bind_beside(address: str, backlog: int, activated: list[str],
                unix: UnixOptions | None = None) -> socket.socket:
    """bind(), with a hint when an activated socket may hold the port (the socket unit and the
    config disagree: "[::]:1060" from ListenStream=1060 holds 0.0.0.0:1060 too)."""
    try:
        return bind(address, backlog, unix)
    except BindError as e:
        if not activated:
            raise
        given = ", ".join(key.removeprefix(ACTIVATED) for key in activated)
        raise BindError(f"{e} (socket activation gave {given}: make lancelotd.socket's ListenStream= "
                        "and the config's addresses agree)") from None


def refuse_new_connections(sock: socket.socket) -> None:
    """Stop new connections from entering a listener we are about to close for good (a stop).

    Between the workers' last accept sweep and the last close, the kernel would still complete
    handshakes into the accept queue, and those connections are reset when the socket closes.
    Two means, the second only when the first is not allowed:
    - a socket filter that drops every new SYN (the kernel may refuse it to an unprivileged
      process: kernel.unprivileged_bpf_disabled); a client's SYN retry, about a second later,
      finds the port closed and is refused;
    - the backlog down to 0: a SYN that finds a connection queued is dropped the same way, so
      at most one connection a listener can slip in after the workers' last sweep.
    Both act on the socket itself, so the workers' copies have them too.
    """
    if sock.family == socket.AF_UNIX:  # its file goes: a new client finds no socket, never a reset
        try:
            os.unlink(sock.getsockname())
        except (OSError, TypeError, ValueError):
            pass
        return
    program = struct.pack("HL", len(_DROP_SYN), ctypes.addressof(_DROP_SYN_CODE))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
        # With the filter on, the backlog stays: at 0, a handshake already under way (its SYN
        # came before the filter) would find the queue "full", its ACK would be dropped, and the
        # client, established on its side, would be reset when the socket closes.
        return
    except OSError as e:  # not fatal: the backlog below narrows the window to one connection
        log.debug("no SYN filter on %s before closing it: %s", format_address(sock.getsockname()), e.strerror)
    try:
        sock.listen(0)
    except OSError as e:
        log.warning("cannot shrink the backlog of %s before closing it: %s",
                    format_address(sock.getsockname()), e.strerror)
