"""Socket activation and the config: which activated socket serves which configured address.

systemd (lancelotd.socket) and the config (`bind`, [[listener]]) each name
addresses; they must agree, or the service says why not:
- a configured address is matched to the activated socket bound to it (the
  spelling may differ: ":1060" is "0.0.0.0:1060"), and its [[listener]]
  options (PROXY protocol) apply to that socket;
- a configured address with no activated socket is bound by the daemon;
- an activated socket no configured address names is served with the
  defaults (no PROXY protocol), with a warning at start and at every reload.
`lancelotd check-config` run with the same sockets (LISTEN_FDS) says the same.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

ACTIVATED = "systemd "  # key prefix of sockets from socket activation


def resolved(address: str) -> tuple[str, str, int] | None:
    """(family, host, port) of a "HOST:PORT" as bind() would bind it; None if it cannot say."""
    from .checks import normal_address  # checks -> scoreboard -> sockets -> here

    try:
        family, host, port = normal_address(address.removeprefix(ACTIVATED))
    except ValueError:
        return None
    if family != "name":
        return family, host, port
    try:  # a host name: the address it resolves to, as sockets.bind() takes the first
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (OSError, IndexError):
        return None
    return normal_address(format_sockaddr(info[4]))


def format_sockaddr(sockaddr: tuple) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def same_address(configured: str, key: str) -> bool:
    """Does the listener `key` (an activated socket's, or a configured address) serve `configured`?"""
    if configured == key:
        return True
    mine, theirs = resolved(configured), resolved(key)
    return mine is not None and mine == theirs and mine[2] != 0  # port 0: a port of its own, never matched


def match(configured: Iterable[str], activated: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """({configured address: the activated key serving it}, activated keys that no address names)."""
    activated = list(activated)
    matched: dict[str, str] = {}
    for address in configured:
        key = next((k for k in activated if k not in matched.values() and same_address(address, k)), None)
        if key is not None:
            matched[address] = key
    return matched, [k for k in activated if k not in matched.values()]


def unnamed_warning(key: str) -> str:
    return (f"socket-activated {key.removeprefix(ACTIVATED)} is not in the configuration: served with the "
            "defaults (no PROXY protocol); name it in server.bind or a [[listener]], or remove it from "
            "lancelotd.socket")


def unbound_note(address: str) -> str:
    return f"{address} has no activated socket: lancelotd binds it itself (add it to lancelotd.socket)"


def report(configured: Iterable[str], activated: Iterable[str]) -> list[str]:
    """check-config's lines about socket activation: one per mismatch, "" for none."""
    configured = list(configured)
    matched, unnamed = match(configured, activated)
    return ([unbound_note(a) for a in configured if a not in matched]
            + [unnamed_warning(k) for k in unnamed])


def check_environment(configured: Iterable[str]) -> list[str]:
    """report() for the sockets systemd passed us (LISTEN_FDS meant for this process), if any:
    what `lancelotd check-config` says when run with them."""
    from .sockets import format_address
    from .systemd import listen_fds

    keys = []
    for sock in listen_fds():
        try:
            keys.append(ACTIVATED + format_address(sock.getsockname()))
        except (OSError, TypeError, IndexError):  # not a listening socket we could name
            pass
        finally:
            sock.detach()  # the descriptor stays systemd's
    return report(configured, keys) if keys else []
