"""The two-phase hand-off gives each connection back at most once, whatever order its
outcomes come in (issue: a connection taken back twice, then closed, then a worker crash).

In-process: a real epoll, real sockets and real SEQPACKET channels, driven through
handoff.HandOff with a small host that keeps its connections the way the Worker does
(a table and an epoll set).  The events for one connection in flight - a refusal, the
channel's EOF, the deadline passing - are applied in every order; an adoption in
every position too.  And the case that broke under chaos: a target that goes away in
the middle of one offer, after it took a first connection.
"""

from __future__ import annotations

import itertools
import select
import socket
import struct
import time
from pathlib import Path

import pytest

from lancelotd import handoff
from lancelotd import rendezvous as wire
from lancelotd.rendezvous import Channel

TARGET = 4242  # the target worker's PID, as the channel knows it (no process is signalled)


class Conn:
    """What the hand-off needs of a worker's connection (rendezvous.Held)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pending = b""  # the unfinished question (Conn is a protocol Session)
        self.last = time.monotonic()
        self.peer = None
        self.client = 0
        self.writing = False


class Host:
    """A worker's table and epoll set, with the same rules as retirement.Retirement."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.resumed: list[Conn] = []
        self.adopted: list[Conn] = []
        self.errors: list[str] = []

    def serve(self, conn: Conn) -> None:
        self.epoll.register(conn.fd, select.EPOLLIN)
        self.conns[conn.fd] = conn

    def watched(self, fd: int) -> bool:
        try:
            self.epoll.modify(fd, select.EPOLLIN)
        except FileNotFoundError:
            return False
        return True

    # --- handoff.Host -----------------------------------------------------
    def refusal(self) -> bytes | None:
        return None

    def adopt_handed(self, sock, pending, now, last, peer) -> bool:  # pragma: no cover - not a receiver
        sock.close()
        return False

    def lend(self, conn: Conn) -> None:
        del self.conns[conn.fd]
        self.epoll.unregister(conn.fd)

    def handed(self, conn: Conn) -> None:
        self.adopted.append(conn)

    def resume(self, conn: Conn, now: float) -> None:
        if self.conns.get(conn.fd) is conn:
            self.errors.append("resumed a connection it serves")
            return
        self.epoll.register(conn.fd, select.EPOLLIN)  # EEXIST here is the bug this file is about
        self.conns[conn.fd] = conn
        self.resumed.append(conn)


@pytest.fixture
def clients():
    """Client connections on loopback; each yields (client side, server side)."""
    made = []
    listener = socket.create_server(("127.0.0.1", 0))

    def make() -> tuple[socket.socket, socket.socket]:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        server.setblocking(False)
        made.extend((client, server))
        return client, server
    yield make
    for sock in made:
        sock.close()
    listener.close()


def sender(tmp_path: Path, host: Host) -> tuple[handoff.HandOff, Channel, socket.socket]:
    """A HandOff with one outbound channel to TARGET; returns it, the channel and the target's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    ho = handoff.HandOff(host, str(tmp_path / "l.pid"), "", None, 100)  # type: ignore[arg-type]
    channel = Channel(ours, TARGET, outbound=True)
    assert ho._watch(channel)
    ho.to[TARGET] = channel
    return ho, channel, theirs


def send(ho: handoff.HandOff, channel: Channel, conns: list[Conn]) -> list[Conn]:
    ho._targets = lambda now: [(TARGET, 0)]  # type: ignore[method-assign]  # no scoreboard here
    return ho.offer(conns, time.monotonic())


def received_ids(theirs: socket.socket) -> list[int]:
    """What the target got: the ids of the messages, closing the descriptors that came along."""
    ids = []
    theirs.setblocking(False)
    while True:
        try:
            data, ancdata, _, _ = theirs.recvmsg(wire.RECEIVE_SIZE, wire.FDS_SPACE)
        except BlockingIOError:
            return ids
        for fd in wire.fds_of(ancdata):
            wire.close_fd(fd)
        ids.append(wire.HAND.unpack_from(data)[2])


EVENTS = ("refused", "eof", "deadline", "adopted")


def apply(event: str, ho: handoff.HandOff, channel: Channel, theirs: socket.socket, ident: int) -> None:
    now = time.monotonic()
    if event in ("refused", "adopted"):
        kind = wire.REFUSED if event == "refused" else wire.ADOPTED
        try:
            theirs.send(wire.ANSWER.pack(kind, ident, wire.FULL))
        except OSError:
            return  # the channel is closed already: that answer can no longer come
        ho.on_event(channel.fd, now)
    elif event == "eof":
        theirs.close()
        ho.on_event(channel.fd, now)
    else:
        ho.tick(now + handoff.ANSWER_WITHIN + handoff.PATIENCE + 1)


@pytest.mark.parametrize("order", list(itertools.permutations(("refused", "eof", "deadline"))),
                         ids="-".join)
def test_refusal_eof_and_deadline_in_any_order_give_a_connection_back_once(tmp_path, clients, order):
    host = Host()
    _, server = clients()
    conn = Conn(server)
    host.serve(conn)
    ho, channel, theirs = sender(tmp_path, host)
    assert send(ho, channel, [conn]) == [conn]
    assert conn.fd not in host.conns and not host.watched(conn.fd)  # in flight: the hand-off's alone
    (ident,) = received_ids(theirs)
    for event in order:
        apply(event, ho, channel, theirs, ident)
    assert host.resumed == [conn]
    assert host.conns == {conn.fd: conn} and host.watched(conn.fd)
    assert conn.sock.fileno() == conn.fd  # open: the client was never closed
    assert not host.errors and not ho.pending()


@pytest.mark.parametrize("position", range(3))
def test_an_adoption_before_or_after_the_others_is_final(tmp_path, clients, position):
    """Adopted first: the connection is the target's, and nothing after gives it back.  Adopted
    after a take-back (a late answer): it stays ours, and the late answer changes nothing."""
    others = ["refused", "eof", "deadline"]
    order = others[:position] + ["adopted"] + others[position:]
    host = Host()
    _, server = clients()
    conn = Conn(server)
    host.serve(conn)
    ho, channel, theirs = sender(tmp_path, host)
    send(ho, channel, [conn])
    (ident,) = received_ids(theirs)
    for event in order:
        apply(event, ho, channel, theirs, ident)
    if position == 0:
        assert host.adopted == [conn] and not host.resumed and not host.conns
        assert conn.sock.fileno() == -1  # our copy closed; the target's lives on
    else:
        assert host.resumed == [conn] and not host.adopted
        assert host.conns == {conn.fd: conn}
    assert not host.errors


class VanishingTarget(socket.socket):
    """Our end of a channel whose target dies right after the first connection reaches it
    (the kernel then fails the next send with EPIPE, as when a worker is SIGKILLed)."""

    other: socket.socket

    def sendmsg(self, *args, **kwargs):  # type: ignore[override]
        sent = super().sendmsg(*args, **kwargs)
        self.other.close()
        return sent


def test_a_target_lost_in_the_middle_of_an_offer_gives_back_only_what_it_took(tmp_path, clients):
    host = Host()
    conns = []
    for _ in range(3):
        _, server = clients()
        conn = Conn(server)
        host.serve(conn)
        conns.append(conn)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours = VanishingTarget(fileno=a.detach())
    ours.other = b
    ours.setblocking(False)
    ho = handoff.HandOff(host, str(tmp_path / "l.pid"), "", None, 100)  # type: ignore[arg-type]
    channel = Channel(ours, TARGET, outbound=True)
    assert ho._watch(channel)
    ho.to[TARGET] = channel
    send(ho, channel, conns)
    # The first went out, then the target vanished: it comes back (once), the others never left.
    assert not host.errors
    assert host.resumed == [conns[0]]
    assert host.conns == {c.fd: c for c in conns}
    assert all(host.watched(c.fd) and c.sock.fileno() == c.fd for c in conns)
    assert not ho.pending()


def test_a_channel_epoll_cannot_watch_is_closed_and_nothing_is_lent(tmp_path, clients):
    """ENOMEM/ENOSPC from epoll for a new channel: closed, so its other end sees EOF."""
    host = Host()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host.epoll.register(ours.fileno(), select.EPOLLIN)  # so that the hand-off's register fails (EEXIST)
    ho = handoff.HandOff(host, str(tmp_path / "l.pid"), "", None, 100)  # type: ignore[arg-type]
    assert not ho._watch(Channel(ours, TARGET, outbound=True))
    assert ours.fileno() == -1 and not ho.channels
    assert theirs.recv(1) == b""  # EOF on the other side
    theirs.close()


@pytest.mark.parametrize("message", ["unversioned", "version 99"])
def test_a_hand_message_of_another_version_is_refused_at_once_by_its_id(tmp_path, clients, message):
    """Across a USR2 upgrade the sender may be another release: its message is refused (X) by its
    id, so the sender serves the connection again at once rather than after the deadline."""
    host = Host()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    receiver = handoff.HandOff(host, str(tmp_path / "l.pid"), "", None, 100)  # type: ignore[arg-type]
    assert receiver._watch(Channel(ours, TARGET, outbound=False))
    client, server = clients()
    if message == "unversioned":  # the format of releases before the version byte
        data = struct.pack("=cIddB16sH", b"H", 77, time.monotonic() + 2, time.monotonic(), 0, b"", 0)
    else:
        data = wire.HAND.pack(wire.HANDED, 99, 77, time.monotonic() + 2, time.monotonic(), 0, b"", 0)
    socket.send_fds(theirs, [data], [server.fileno()])
    receiver.on_event(ours.fileno(), time.monotonic())
    answer = theirs.recv(64)
    assert wire.ANSWER.unpack(answer) == (wire.REFUSED, 77, wire.MALFORMED)
    assert not host.conns  # nothing adopted: the sender's copy is the one that lives on
    theirs.close()
