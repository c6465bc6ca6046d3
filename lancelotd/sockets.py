"""Listening sockets: address parsing, binding, and naming them in logs."""

from __future__ import annotations

import socket


class BindError(Exception):
    """A configured address could not be bound; the message names it."""


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT' or ':PORT' (all IPv4 interfaces) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (port 0-65535; IPv6 as [::1]:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, e.g. [::1]:1060")
    return host or "0.0.0.0", int(port)


def format_address(sockaddr: tuple) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(address: str, backlog: int) -> socket.socket:
    """A listening socket for `address`, inheritable by forked workers only.

    The socket stays blocking: workers watch it with EPOLLEXCLUSIVE and accept
    non-blockingly with accept4 flags, never with settimeout(), which would
    turn every accept into poll+accept and wake all workers at once.
    """
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
    return sock


def bind_all(addresses: tuple[str, ...], backlog: int) -> list[socket.socket]:
    """Bind every address, or none: on failure the ones already bound are closed."""
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            sockets.append(bind(address, backlog))
    except BindError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
