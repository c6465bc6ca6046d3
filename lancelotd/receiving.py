"""The receiving half of the hand-off: our inbox, adopting or refusing what a sender hands us.

A room of handoff.HandOff (which has the sending half, the channels and the wire's timing).
Owns inbox, inbox_paused, inbox_failing and taken; reads and writes channels only through
HandOff's _watch, _lost and _open.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from typing import TYPE_CHECKING

from . import rendezvous as wire
from .logs import log
from .rendezvous import Channel
from .sockets import unpack_address

if TYPE_CHECKING:
    from .handoff import HandOff

ACCEPT_FAILED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED})


class Receiving:
    """HandOff's inbox and answers (a mixin)."""

    def start(self: HandOff) -> None:
        """Open our inbox; without one we serve on, but nobody can hand us connections."""
        try:
            self.inbox = self.rendezvous.listen()
        except OSError as e:
            log.warning("no hand-off inbox (%s): retiring workers will not hand connections to this one",
                        e.strerror or e)
            return
        try:
            self.host.epoll.register(self.inbox.fileno(), select.EPOLLIN)
        except OSError as e:  # ENOMEM, ENOSPC: the same, and nobody may find an inbox we never read
            log.warning("cannot watch the hand-off inbox (%s): retiring workers will not hand "
                        "connections to this one", e.strerror)
            self.stop_receiving()

    def stop_receiving(self: HandOff) -> None:
        """We no longer serve: close the inbox (a channel still queued there is reset, and its
        sender serves its connections again); channels already open get refusals."""
        if self.inbox is not None:
            self.inbox.close()  # also leaves the epoll set
            self.inbox = None
            self.rendezvous.remove()

    def _accept(self: HandOff) -> None:
        assert self.inbox is not None
        for _ in range(16):
            try:
                sock, _ = self.inbox.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in ACCEPT_FAILED:  # the channel stays queued: try again next tick
                    if not self.inbox_failing:
                        log.warning("cannot accept a hand-off channel (%s): trying again once a tick",
                                    e.strerror)
                    self.inbox_failing = True
                    self.host.epoll.unregister(self.inbox.fileno())
                    self.inbox_paused = True
                    return
                continue  # that sender is gone
            self.inbox_failing = False
            pid, uid = self.rendezvous.peer(sock)
            if uid != self.rendezvous.uid:
                log.warning("hand-off channel from pid %d uid %d refused: not our user", pid, uid)
                sock.close()
                continue
            sock.setblocking(False)
            self._watch(Channel(sock, pid, outbound=False))  # if not: closed, its sender serves on

    def _received(self: HandOff, channel: Channel, data: bytes, fds: list[int], flags: int) -> None:
        """A connection handed to us: adopt it, or refuse it (the sender still has its own copy)."""
        for extra in fds[1:]:
            wire.close_fd(extra)
        if data[:1] != wire.HANDED or len(data) < 2 or data[1] != wire.VERSION:
            return self._other_version(channel, data, fds)
        if len(data) < wire.HAND.size or flags & socket.MSG_TRUNC:
            for fd in fds[:1]:
                wire.close_fd(fd)
            return  # no id to answer by: the sender takes it back at the deadline
        _, _, ident, deadline, last, family, address, port = wire.HAND.unpack_from(data)
        pending, peer = data[wire.HAND.size:], unpack_address(family, address, port)
        sock = wire.socket_of(fds[0]) if fds else None
        if sock is None:
            reason: bytes | None = wire.NO_FD if flags & socket.MSG_CTRUNC else wire.MALFORMED
        elif time.monotonic() > deadline:  # the sender may be serving it again
            reason = wire.LATE
        else:
            reason = self.host.refusal()
        if reason is None and sock is not None:
            if self.host.adopt_handed(sock, pending, time.monotonic(), last, peer):
                self.taken += 1
                self._answer(channel, wire.ANSWER.pack(wire.ADOPTED, ident, b"-"), None, b"", None)
                return
            reason, sock = wire.FULL, None  # unwatchable here (and closed): its sender serves it again
        reason = reason or wire.MALFORMED
        log_refusal = log.warning if reason in (wire.NO_FD, wire.MALFORMED) else log.info
        log_refusal("refused a connection from worker %d: %s", channel.peer, wire.REASONS[reason])
        self._answer(channel, wire.ANSWER.pack(wire.REFUSED, ident, reason), sock, pending, peer)

    def _other_version(self: HandOff, channel: Channel, data: bytes, fds: list[int]) -> None:
        """A hand message we cannot read (another release, across a USR2): refused by its id, so its
        sender serves the connection again at once instead of after the deadline."""
        for fd in fds:
            wire.close_fd(fd)  # the sender keeps its own copy
        at = 1 if data[:1] == wire.UNVERSIONED else 2
        version = "none" if at == 1 else str(data[1])
        if len(data) < at + wire.IDENT.size:
            log.warning("hand-off message from worker %d too short to answer: ignored", channel.peer)
            return
        (ident,) = wire.IDENT.unpack_from(data, at)
        log.warning("refused a connection from worker %d: hand-off format version %s, ours is %d",
                    channel.peer, version, wire.VERSION)
        self._answer(channel, wire.ANSWER.pack(wire.REFUSED, ident, wire.MALFORMED), None, b"", None)

    def _answer(self: HandOff, channel: Channel, message: bytes, held: socket.socket | None, pending: bytes,
                peer: tuple | None) -> None:
        channel.outbox.append((message, held, pending, peer))
        self._flush(channel)

    def _flush(self: HandOff, channel: Channel) -> None:
        """Send the answers queued; a refused connection's copy is closed once its refusal is out."""
        while channel.outbox:
            message, held, _pending, _peer = channel.outbox[0]
            try:
                channel.sock.send(message)
            except OSError as e:
                if e.errno in PEER_GONE:
                    self._lost(channel)
                    return
                self._watch_out(channel, True)  # EAGAIN, ENOBUFS: when it is writable, or next tick
                return
            channel.outbox.popleft()
            if held is not None:
                held.close()  # the sender holds its own copy: nothing reaches the client
        self._watch_out(channel, False)

