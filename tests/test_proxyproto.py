"""Issue 12, item 5: the PROXY protocol v2 parser (lancelotd/proxyproto.py), without a daemon.

The bytes HAProxy 2.6.12 sent in the design note (scale-out.md §2.5) parse to the addresses it
meant; any split of a stream gives the verdict of the whole; garbage never crashes the parser
and never makes it consume past a header.
"""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from lancelotd import proxyproto
from lancelotd.proxyproto import (
    LOCAL,
    NEED_MORE,
    PROXY,
    SIGNATURE,
    Header,
    HeaderReader,
    Invalid,
    build,
    parse,
)

QUESTION = b"What is your name?"
# scale-out.md §2.5, as captured behind HAProxy 2.6.12
HEALTH_CHECK = bytes.fromhex("0d0a0d0a000d0a515549540a" "20" "00" "0000") + QUESTION
CLIENT = bytes.fromhex("0d0a0d0a000d0a515549540a" "21" "11" "000c"
                       "c6120002" "c6120001" "79f6" "0426") + QUESTION


def feed_in_pieces(stream: bytes, cuts: list[int]) -> tuple[object, bytes]:
    """Feed `stream` cut at `cuts`, as the worker does: stop at the first verdict."""
    reader = HeaderReader()
    result: object = NEED_MORE
    start = 0
    for end in [*sorted(set(cuts)), len(stream)]:
        result = reader.feed(stream[start:end])
        start = end
        if result is not NEED_MORE:
            break
    return result, reader.rest + stream[start:] if isinstance(result, Header) else b""


def test_haproxy_client_connection_bytes():
    result = parse(CLIENT)
    assert result == Header(PROXY, 0x11, ("198.18.0.2", 31222), ("198.18.0.1", 1062), 28)
    assert CLIENT[result.consumed:] == QUESTION


def test_haproxy_health_check_is_local():
    result = parse(HEALTH_CHECK)
    assert isinstance(result, Header) and result.local and result.source is None
    assert HEALTH_CHECK[result.consumed:] == QUESTION


def test_ipv6_and_tlvs_skipped():
    header = build(PROXY, ("2001:db8::7", 40000), ("2001:db8::1", 1060), tlvs=b"\x04\x00\x04abcd")
    assert len(header) == 52 + 7
    result = parse(header + QUESTION)
    assert result == Header(PROXY, 0x21, ("2001:db8::7", 40000, 0, 0), ("2001:db8::1", 1060, 0, 0), 59)


def test_other_families_carry_no_address():
    for family in (0x00, 0x31, 0x32, 0x12):  # UNSPEC, UNIX stream/dgram, UDP: the socket's endpoints stand
        stream = SIGNATURE + bytes([0x21, family]) + (216).to_bytes(2, "big") + bytes(216) + QUESTION
        result = parse(stream)
        assert isinstance(result, Header) and result.source is None and result.consumed == 232, family


def test_invalid_headers():
    assert parse(QUESTION) == Invalid("no PROXY protocol v2 signature")
    v1 = b"PROXY TCP4 198.18.0.2 198.18.0.1 31222 1062\r\n"
    assert parse(v1) == Invalid("no PROXY protocol v2 signature")
    assert parse(SIGNATURE + b"\x11\x11") == Invalid("PROXY protocol version 1, not 2")
    assert parse(SIGNATURE + b"\x22") == Invalid("unknown PROXY command 0x2")
    assert isinstance(parse(SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11)), Invalid)  # too short for TCP4
    assert isinstance(parse(SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12)), Invalid)  # too short for TCP6
    assert isinstance(parse(SIGNATURE + b"\x20\x00\xff\xff"), Invalid)  # above MAX_LENGTH
    # LOCAL needs no addresses, whatever its family says
    assert isinstance(parse(SIGNATURE + b"\x20\x11\x00\x00"), Header)


def test_need_more_until_complete():
    for end in range(len(CLIENT[:28])):
        assert parse(CLIENT[:end]) is NEED_MORE, end
    assert isinstance(parse(CLIENT[:28]), Header)


# --- properties ---------------------------------------------------------------------------------

addresses4 = st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535))
addresses6 = st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535))
tlvs = st.binary(max_size=64)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Headers of every kind, valid or not, followed by the client's bytes."""
    kind = draw(st.sampled_from(["v4", "v6", "local", "other", "mutant", "garbage"]))
    rest = draw(st.binary(max_size=40))
    if kind == "garbage":
        return draw(st.binary(max_size=80)) + rest
    if kind == "local":
        header = build(LOCAL, tlvs=draw(tlvs))
    elif kind == "other":
        header = build(PROXY, tlvs=draw(tlvs), family=draw(st.integers(0, 255)))
    else:
        pair = addresses4 if kind == "v4" else addresses6
        header = build(PROXY, draw(pair), draw(pair), tlvs=draw(tlvs))
    if kind == "mutant":  # one byte of a valid header changed
        at = draw(st.integers(0, len(header) - 1))
        header = header[:at] + bytes([draw(st.integers(0, 255))]) + header[at + 1:]
    return header + rest


@settings(max_examples=400)
@given(streams(), st.lists(st.integers(0, 200), max_size=12))
def test_any_split_gives_the_verdict_of_the_whole(stream, cuts):
    whole = parse(stream)
    assert whole is not NEED_MORE or len(stream) < proxyproto.FIXED + proxyproto.MAX_LENGTH
    result, rest = feed_in_pieces(stream, [c for c in cuts if c < len(stream)])
    assert result == whole
    if isinstance(whole, Header):
        assert rest == stream[whole.consumed:]


@settings(max_examples=400)
@given(streams())
def test_never_consumes_past_the_header(stream):
    result = parse(stream)
    if isinstance(result, Header):
        length = int.from_bytes(stream[14:16], "big")
        assert result.consumed == 16 + length <= len(stream)
        assert stream[:12] == SIGNATURE


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_never_crashes(data):
    result = parse(data)
    assert result is NEED_MORE or isinstance(result, (Header, Invalid))
    if result is NEED_MORE:  # only a prefix of something that may still be a header
        assert SIGNATURE.startswith(data[:12])


@given(addresses4 | addresses6, addresses4 | addresses6)
def test_addresses_round_trip(source, destination):
    if (":" in source[0]) != (":" in destination[0]):
        return
    result = parse(build(PROXY, source, destination))
    assert isinstance(result, Header)
    v6 = ":" in source[0]
    norm = (lambda a: (socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, a[0])), a[1], 0, 0)
            ) if v6 else (lambda a: a)
    assert result.source == norm(source) and result.destination == norm(destination)
