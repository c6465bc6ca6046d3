"""Access control at accept (docs/PROMISES.md §7): `allow` / `deny` rules and `max_connections_per_client`.

Checked on the address accept() returns, before a byte is read; per
connection, never per request.  On a PROXY protocol listener (proxied.py),
on the client's address in the header instead, once the header is read.
A worker with no rules and no limit has no Gate at all (`Worker.gate is None`), so it pays nothing.

The rule order ("deny wins"): an address that matches any `deny` entry is
refused; otherwise, if `allow` is not empty, it must match an `allow` entry;
otherwise it is admitted.  An IPv4-mapped IPv6 address (::ffff:a.b.c.d, as a
dual-stack listener reports an IPv4 client) is the IPv4 address for both the
rules and the per-client count.  With `max_connections_per_client_ipv6_prefix`
(e.g. 64) an IPv6 client is counted by its /N block, since one host can take
any address of its /64 (privacy addresses, or an attacker rotating them).

A refused connection is closed at once: the client sent nothing we read,
whatever it sent before accept() is dropped first, so close() sends a FIN,
not a reset.  Refusals are counted by cause in the worker's counters.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

from .clients import ClientCounts, ClientTable

DENIED, PER_CLIENT_LIMIT = "denied", "per_client_limit"
ALL = "all"  # nginx's word for every address, IPv4 and IPv6
MAPPED = b"\0" * 10 + b"\xff\xff"  # the prefix of an IPv4-mapped IPv6 address

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_rule(text: str) -> list[Network]:
    """An `allow`/`deny` entry: "all", an address, or a CIDR block; ValueError says why not.

    An IPv4-mapped IPv6 block (::ffff:10.0.0.0/104) is the IPv4 block it maps.
    """
    if text == ALL:
        return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"{text!r} is not an address or CIDR block ({e})") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return [ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")]
    return [net]


def client_of(addr: object) -> tuple[int, int] | None:
    """(IP version, address as an int) of what accept() returned; None if not IP (a UNIX socket)."""
    if not isinstance(addr, tuple):
        return None
    host = addr[0]
    if len(addr) == 2:
        return 4, int.from_bytes(socket.inet_aton(host), "big")
    packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    if packed.startswith(MAPPED):
        return 4, int.from_bytes(packed[12:], "big")
    return 6, int.from_bytes(packed, "big")


class NetSet:
    """Networks grouped by prefix length: a lookup is one mask and one set probe per length used."""

    def __init__(self, entries: Iterable[str]) -> None:
        groups: dict[tuple[int, int], set[int]] = {}
        for entry in entries:
            for net in parse_rule(entry):
                bits = net.max_prefixlen
                mask = ((1 << bits) - 1) ^ ((1 << (bits - net.prefixlen)) - 1)
                groups.setdefault((net.version, mask), set()).add(int(net.network_address))
        self.by_version: dict[int, list[tuple[int, frozenset[int]]]] = {4: [], 6: []}
        for (version, mask), nets in sorted(groups.items(), key=lambda item: -len(item[1])):
            self.by_version[version].append((mask, frozenset(nets)))
        self.empty = not groups

    def __contains__(self, client: tuple[int, int]) -> bool:
        version, ip = client
        return any(ip & mask in nets for mask, nets in self.by_version[version])


class Rules:
    """allow / deny, deny first (see the module docstring)."""

    def __init__(self, allow: Sequence[str], deny: Sequence[str]) -> None:
        self.allow = NetSet(allow)
        self.deny = NetSet(deny)

    def permits(self, client: tuple[int, int]) -> bool:
        if client in self.deny:
            return False
        return self.allow.empty or client in self.allow


class Gate:
    """One worker's access checks: its config's rules and its share of the per-client counts.

    admit() is the check at accept; adopt() the check of a connection handed
    over from another worker (the rules only: an open connection is never
    closed for the per-client limit); release() when a counted one leaves.
    A counted connection is known by its fingerprint in the shared table
    (see clients.py); 0 means "not counted".
    """

    def __init__(self, allow: Sequence[str], deny: Sequence[str], limit: int,
                 table: ClientTable | None, region: int, ipv6_prefix: int = 128) -> None:
        self.rules = Rules(allow, deny) if allow or deny else None
        self.v6_mask = ((1 << 128) - 1) ^ ((1 << (128 - ipv6_prefix)) - 1)
        self.limit = limit
        self.table = table if limit else None
        self.counts = ClientCounts(table, region) if table is not None and limit else None

    def admit(self, addr: object) -> tuple[str | None, int]:
        """(refusal cause or None, fingerprint to count the connection under, or 0)."""
        client = client_of(addr)
        if client is None:
            return None, 0
        if self.rules is not None and not self.rules.permits(client):
            return DENIED, 0
        if self.counts is None:
            return None, 0
        fingerprint = self.counts.table.fingerprint(self.counted_as(client))
        if self.counts.table.total(fingerprint, self.limit) >= self.limit:
            return PER_CLIENT_LIMIT, 0
        return None, fingerprint if self.counts.add(fingerprint) else 0

    def adopt(self, addr: object) -> tuple[bool, int]:
        """(permitted by our rules, fingerprint it is now counted under, or 0), for a connection
        from `addr` (its socket's peer, or its PROXY header's source) handed over."""
        client = client_of(addr)
        if client is None:
            return True, 0
        if self.rules is not None and not self.rules.permits(client):
            return False, 0
        if self.counts is None:
            return True, 0
        fingerprint = self.counts.table.fingerprint(self.counted_as(client))
        return True, fingerprint if self.counts.add(fingerprint) else 0

    def fingerprint_of(self, sock: socket.socket) -> int:
        """What a connection is counted under here (0: not counted, or not IP, or gone)."""
        try:
            client = client_of(sock.getpeername())
        except OSError:
            return 0
        return 0 if client is None or self.counts is None else \
            self.counts.table.fingerprint(self.counted_as(client))

    def counted_as(self, client: tuple[int, int]) -> tuple[int, int]:
        """What the per-client count keys on: the address, or an IPv6 address's /N block."""
        version, ip = client
        return (version, ip & self.v6_mask) if version == 6 else client

    def release(self, fingerprint: int) -> None:
        if self.counts is not None:
            self.counts.remove(fingerprint)


def make_gate(allow: Sequence[str], deny: Sequence[str], limit: int, table: ClientTable | None,
              region: int, ipv6_prefix: int = 128) -> Gate | None:
    """A worker's Gate, or None when it has nothing to check (the common case: no cost)."""
    if not allow and not deny and not (limit and table is not None):
        return None
    return Gate(allow, deny, limit, table, region, ipv6_prefix)


def refuse(sock: socket.socket) -> None:
    """Close a refused connection: drop what it may have sent before accept, so close() is a FIN."""
    try:
        sock.setblocking(False)
        sock.recv(65536)
    except OSError:
        pass
    sock.close()
