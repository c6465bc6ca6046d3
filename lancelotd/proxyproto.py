"""The PROXY protocol version 2 header, as a pure byte-stream parser (haproxy's proxy-protocol.txt).

No sockets here, in the manner of protocol.py: a worker feeds what recv()
returned until the header is done, then hands the bytes after it (the
client's first question, often in the same segment) to the protocol Session.
Version 2 only; a listener either requires the header or never parses one,
so nothing here guesses whether one is present.

The header: the 12-byte signature, one byte of version (high nibble, 2) and
command (0 LOCAL, 1 PROXY), one byte of address family and transport, a
big-endian length of what follows, then the addresses and TLVs.

- LOCAL (a balancer's own health check): the addresses are ignored; the
  connection is served from the socket's own endpoints.
- PROXY over TCP/IPv4 (0x11) or TCP/IPv6 (0x21): the client's address and
  port, and the address it connected to.  Any other family (UNSPEC, UNIX,
  datagrams: none is a TCP client) carries no address we use: the socket's
  endpoints stand, as the spec allows ("free to accept the connection anyway
  and use the real endpoint addresses").
- TLVs after the addresses are skipped ("MUST always consider this field to
  skip the appropriate number of bytes").

A verdict depends on the bytes only, never on how they were split: each
check looks at one position of the stream, in stream order, as soon as it
has arrived.  Nothing past the header's length is ever consumed.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\0\r\nQUIT\n"
FIXED = 16  # signature, version/command, family, length
MAX_LENGTH = 1024  # of addresses + TLVs: far above what HAProxy sends (28 or 52 bytes with no TLV)
LOCAL, PROXY = 0x0, 0x1
TCP4, TCP6 = 0x11, 0x21
ADDRESS_BYTES = {TCP4: 12, TCP6: 36}


@dataclass(frozen=True)
class Header:
    """A complete header.  `source`/`destination` are socket-module addresses ((host, port), or
    (host, port, 0, 0) for IPv6), None when the socket's own endpoints stand (LOCAL, other families)."""

    command: int  # LOCAL or PROXY
    family: int  # the family/transport byte as sent
    source: tuple | None
    destination: tuple | None
    consumed: int  # bytes of the stream the header took: what follows is the client's

    @property
    def local(self) -> bool:
        return self.command == LOCAL


@dataclass(frozen=True)
class Invalid:
    reason: str


NEED_MORE = None  # parse(): the header is not complete yet, and nothing so far is wrong
Result = Header | Invalid | None


def parse(data: bytes) -> Result:
    """The verdict on the start of a stream: NEED_MORE, a Header, or Invalid(reason)."""
    have = min(len(data), len(SIGNATURE))
    if data[:have] != SIGNATURE[:have]:
        return Invalid("no PROXY protocol v2 signature")
    if len(data) <= 12:
        return NEED_MORE
    version, command = data[12] >> 4, data[12] & 0xF
    if version != 2:
        return Invalid(f"PROXY protocol version {version}, not 2")
    if command not in (LOCAL, PROXY):
        return Invalid(f"unknown PROXY command {command:#x}")
    if len(data) < FIXED:
        return NEED_MORE
    family = data[13]
    length = int.from_bytes(data[14:16], "big")
    if length > MAX_LENGTH:
        return Invalid(f"header length {length} above {MAX_LENGTH}")
    needed = ADDRESS_BYTES.get(family, 0) if command == PROXY else 0
    if length < needed:
        return Invalid(f"header length {length} too short for its addresses ({needed} bytes)")
    if len(data) < FIXED + length:
        return NEED_MORE
    source = destination = None
    if needed:
        source, destination = _addresses(family, data[FIXED:FIXED + needed])
    return Header(command, family, source, destination, FIXED + length)


def _addresses(family: int, raw: bytes) -> tuple[tuple, tuple]:
    if family == TCP4:
        sport, dport = struct.unpack("!HH", raw[8:12])
        return ((socket.inet_ntop(socket.AF_INET, raw[0:4]), sport),
                (socket.inet_ntop(socket.AF_INET, raw[4:8]), dport))
    sport, dport = struct.unpack("!HH", raw[32:36])
    return ((socket.inet_ntop(socket.AF_INET6, raw[0:16]), sport, 0, 0),
            (socket.inet_ntop(socket.AF_INET6, raw[16:32]), dport, 0, 0))


class HeaderReader:
    """One connection's header on its way: feed() what arrives, until it is not NEED_MORE.

    Once done, `rest` holds the bytes after the header (the client's own).
    """

    __slots__ = ("buffer", "rest")

    def __init__(self) -> None:
        self.buffer = b""
        self.rest = b""

    def feed(self, data: bytes) -> Result:
        self.buffer += data
        result = parse(self.buffer)
        if isinstance(result, Header):
            self.rest = self.buffer[result.consumed:]
        return result


def build(command: int = PROXY, source: tuple | None = None, destination: tuple | None = None,
          tlvs: bytes = b"", family: int | None = None) -> bytes:
    """A header as a sender writes it (for the tests, and anyone who wants to check a listener)."""
    if source is None or destination is None:
        return SIGNATURE + bytes([0x20 | command, family or 0]) + len(tlvs).to_bytes(2, "big") + tlvs
    v6 = ":" in source[0]
    af = socket.AF_INET6 if v6 else socket.AF_INET
    body = (socket.inet_pton(af, source[0]) + socket.inet_pton(af, destination[0])
            + struct.pack("!HH", source[1], destination[1]) + tlvs)
    fam = family if family is not None else (TCP6 if v6 else TCP4)
    return SIGNATURE + bytes([0x20 | command, fam]) + len(body).to_bytes(2, "big") + body
