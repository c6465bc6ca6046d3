"""Handing live connections from a retiring worker to a current one, in two phases.

A retired worker (reload, TTOU, max_requests, USR2 upgrade) does not make its
clients wait for graceful_timeout and then disconnect them: at a question
boundary (its answers flushed) it sends each connection's socket over
SCM_RIGHTS, with the bytes of any unfinished question, to a serving worker of
the current generation, which carries on serving it.  The client sees nothing.

Two phases, because a socket in flight can be lost: the sender keeps its own
copy of each connection it sent (out of its epoll set: nobody reads or writes
it) until the receiver answers for it.  "Adopted": the sender closes its copy
(the receiver's lives on, so the client notices nothing).  "Refused" (full,
leaving, too late, out of descriptors), the channel closing, or no answer in
time: the sender serves the connection again.  A receiver adopts only before
the deadline written in the message (CLOCK_MONOTONIC, one clock for every
process), and the sender takes a connection back only PATIENCE after it: so the
two never both serve one.  The wire protocol is in docs/DESIGN.md.

The receiving half is receiving.py; the rendezvous and the wire format are in
rendezvous.py (inboxes in the PID file's directory, peer credentials checked both
ways); targets come from the scoreboard beside the PID file, which after a USR2
upgrade is the new master's.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from typing import Protocol

from . import rendezvous as wire
from .logs import log
from .receiving import PEER_GONE, Receiving
from .rendezvous import Channel, Held, Rendezvous
from .scoreboard import SERVING, Scoreboard
from .sockets import pack_address

CLOEXEC = socket.MSG_CMSG_CLOEXEC
ANSWER_WITHIN = 2.0  # a receiver adopts a connection only this soon after it was sent
PATIENCE = 1.0  # and the sender takes it back only this long after that deadline
IN_FLIGHT_PER_TARGET = 32  # far below what a channel's buffer holds: an answer never meets EAGAIN
REST_FOR = 5.0  # seconds a target that refused or failed is left alone


class Host(Protocol):
    """What the hand-off needs of its worker (retirement.py)."""

    epoll: select.epoll

    def refusal(self) -> bytes | None: ...  # why we cannot adopt a connection now, or None
    def adopt_handed(self, sock: socket.socket, pending: bytes, now: float, last: float,
                     peer: tuple | None) -> bool: ...  # False: it cannot be watched (our copy is closed)
    def lend(self, conn: Held) -> None: ...  # one we just sent: out of our table and epoll set
    def handed(self, conn: Held) -> None: ...  # one we sent was adopted (before we close our copy)
    def resume(self, conn: Held, now: float) -> None: ...  # serve again one sent but not adopted


class HandOff(Receiving):
    """Both sides of the hand-off for one worker: its inbox, its channels, its connections in flight."""

    def __init__(self, host: Host, pid_file: str, board_path: str, own_board: Scoreboard,
                 max_connections: int) -> None:
        self.host = host
        self.rendezvous = Rendezvous(pid_file)
        self.board_path = board_path  # the public scoreboard: after a USR2 upgrade, the new master's
        self.own_board = own_board
        self.max_connections = max_connections  # ours: a hint only, the target's own limit rules
        self.inbox: socket.socket | None = None
        self.inbox_paused = False  # out of descriptors: not watching the inbox until the next tick
        self.inbox_failing = False  # accept() failing for want of descriptors: logged once
        self.channels: dict[int, Channel] = {}  # fd -> channel, both directions
        self.to: dict[int, Channel] = {}  # target pid -> outbound channel
        self.sent: dict[int, int] = {}  # target pid -> connections it took, for a fair spread
        self.resting: dict[int, float] = {}  # target pid -> when to try it again
        self.last_id = 0
        self.no_target = ""  # what the last look at the scoreboard found, when it found no target
        self.why_none = ""  # why the last offer sent nothing (retirement._hand_off logs it)
        self.adopted = 0  # connections our targets adopted
        self.taken = 0  # connections we adopted

    # --- sending ---------------------------------------------------------

    def offer(self, conns: list[Held], now: float) -> list[Held]:
        """Send each connection to the least loaded target that takes it; the ones sent.

        Those are in flight: the moment a connection is sent, the host lends it to
        us (host.lend: out of its table and its epoll set) and touches it no more,
        until resume() gives it back.  So each connection has one owner at a
        time: a channel lost in the middle of this very offer gives back only
        what was lent already.  A connection that cannot go (no target, too
        large) stays; the others still go.
        """
        targets = self._targets(now)
        self.why_none = "" if targets else self.no_target
        sent: list[Held] = []
        for conn in conns:
            if not targets:
                break
            pending = conn.pending
            if len(pending) > wire.MAX_PENDING:
                continue
            while targets:
                pid, load = targets[0]
                channel = self._channel(pid, now)
                outcome = "busy" if channel is None else self._send(channel, conn, pending)
                if outcome == "sent":
                    sent.append(conn)
                    self.sent[pid] = self.sent.get(pid, 0) + 1
                    if load + 1 >= self.max_connections or len(self.to[pid].flights) >= IN_FLIGHT_PER_TARGET:
                        targets.pop(0)  # full as far as we know
                    else:
                        targets[0] = (pid, load + 1)
                        targets.sort(key=lambda t: t[1])
                    break
                if outcome == "too large":
                    break  # this one stays with us; the next one may go
                targets.pop(0)
        return sent

    def _send(self, channel: Channel, conn: Held, pending: bytes) -> str:
        self.last_id = (self.last_id + 1) & 0xFFFFFFFF
        deadline = time.monotonic() + ANSWER_WITHIN
        try:
            header = wire.HAND.pack(wire.HANDED, wire.VERSION, self.last_id, deadline, conn.last,
                                    *pack_address(conn.peer))
            socket.send_fds(channel.sock, [header, pending], [conn.fd])
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                return "too large"
            if e.errno in PEER_GONE:
                self._lost(channel)
            return "busy"  # EAGAIN, ENOBUFS, ETOOMANYREFS: next round
        self.host.lend(conn)  # at once: from now on only this flight may give it back
        channel.flights[self.last_id] = (conn, deadline)
        return "sent"

    def _answered(self, channel: Channel, data: bytes, now: float) -> None:
        kind, ident, reason = wire.ANSWER.unpack(data)
        flight = channel.flights.pop(ident, None)
        if flight is None:  # taken back already: by the deadline rule the answer is a refusal
            if kind == wire.ADOPTED:
                log.error("worker %d adopted connection %d after its deadline", channel.peer, ident)
            return
        conn = flight[0]
        if kind == wire.ADOPTED:
            self.host.handed(conn)
            conn.sock.close()  # the target's copy lives on: nothing reaches the client
            self.adopted += 1
            return
        self.sent[channel.peer] = max(0, self.sent.get(channel.peer, 0) - 1)
        self.resting[channel.peer] = now + REST_FOR
        log.info("a connection came back from worker %d (%s): serving it here", channel.peer,
                 wire.REASONS.get(reason, "?"))
        self.host.resume(conn, now)

    def _targets(self, now: float) -> list[tuple[int, int]]:
        """(pid, load) of the current generation's serving workers, least loaded first."""
        board = self.own_board
        try:
            if self.board_path:
                board = Scoreboard.open(self.board_path)
        except (OSError, ValueError):
            pass
        try:
            header = board.read_header()  # once: a second read could see another master's header
            current = header.generation
            found = []
            seen = {"serving": 0, "resting": 0, "full": 0}
            for _, slot in board.slots():
                pid = slot.pid
                if slot.generation != current or slot.state != SERVING or pid == self.rendezvous.pid:
                    continue
                seen["serving"] += 1
                if self.resting.get(pid, 0.0) > now:
                    seen["resting"] += 1
                    continue
                load = slot.connections + self.sent.get(pid, 0)
                if load < self.max_connections:
                    found.append((load, pid))
                else:
                    seen["full"] += 1
            # Why a hand-off may find nobody, for the worker's log line (retirement._hand_off).
            self.no_target = (f"generation {current} of master {header.master_pid} has "
                              f"{seen['serving']} other serving workers, {seen['resting']} resting after a "
                              f"refusal, {seen['full']} full")
        finally:
            if board is not self.own_board:
                board.close()
        return [(pid, load) for load, pid in sorted(found)]

    def _channel(self, pid: int, now: float) -> Channel | None:
        channel = self.to.get(pid)
        if channel is not None:
            return channel if len(channel.flights) < IN_FLIGHT_PER_TARGET else None
        try:
            sock = self.rendezvous.connect(pid)
        except BlockingIOError:
            return None  # its inbox's queue is full: next round
        except PermissionError as e:  # not the worker the scoreboard names
            log.warning("not handing connections to worker %d: %s", pid, e.strerror)
            self.resting[pid] = now + REST_FOR
            return None
        except OSError:  # it stopped receiving (retiring, gone), or we are out of descriptors
            self.resting[pid] = now + REST_FOR
            return None
        channel = Channel(sock, pid, outbound=True)
        if not self._watch(channel):  # nothing in flight on it yet: the connections stay with us
            self.resting[pid] = now + REST_FOR
            return None
        self.to[pid] = channel
        return channel

    # --- both ------------------------------------------------------------

    def on_event(self, fd: int, now: float) -> bool:
        """Our inbox or a channel is ready; True if a target answered (room, or connections back)."""
        if self.inbox is not None and fd == self.inbox.fileno():
            self._accept()
            return False
        channel = self.channels.get(fd)
        if channel is None:
            _unwatch(self.host.epoll, fd)
            return False
        answered = self._read(channel, now)
        if channel.outbox and self._open(channel):
            self._flush(channel)
        return answered

    def _read(self, channel: Channel, now: float) -> bool:
        answered = False
        while self._open(channel):
            try:
                data, ancdata, flags, _ = channel.sock.recvmsg(wire.RECEIVE_SIZE, wire.FDS_SPACE, CLOEXEC)
            except BlockingIOError:
                break
            except OSError:
                data, ancdata, flags = b"", [], 0
            fds = wire.fds_of(ancdata)
            if not data:  # EOF: the other side is gone (what it sent before is read already)
                for fd in fds:
                    wire.close_fd(fd)
                answered = answered or bool(channel.flights)
                self._lost(channel)
                break
            if data[:1] in (wire.HANDED, wire.UNVERSIONED):
                self._received(channel, data, fds, flags)
                continue
            for fd in fds:  # an answer carries no descriptor: we kept our own copy
                wire.close_fd(fd)
            if len(data) == wire.ANSWER.size and data[:1] in (wire.ADOPTED, wire.REFUSED):
                self._answered(channel, data, now)
                answered = True
        return answered

    def _lost(self, channel: Channel) -> None:
        """The channel is closed or broken: what was in flight on it is ours again."""
        if not self._open(channel):
            return
        now = time.monotonic()
        del self.channels[channel.fd]
        if self.to.get(channel.peer) is channel:
            del self.to[channel.peer]
        if channel.flights:
            log.info("worker %d is gone with %d connections in flight to it: serving them here",
                     channel.peer, len(channel.flights))
            self.resting[channel.peer] = now + REST_FOR
            for conn, _deadline in channel.flights.values():
                self.host.resume(conn, now)
            channel.flights.clear()
        for _message, held, pending, peer in channel.outbox:
            if held is not None:  # refused, but its sender is gone: we may hold the last copy
                log.info("the sender of a connection we refused is gone: serving it here")
                # a fresh timer: its own was not sent
                if self.host.adopt_handed(held, pending, now, now, peer):
                    self.taken += 1
        channel.outbox.clear()
        _unwatch(self.host.epoll, channel.fd)
        channel.sock.close()

    def tick(self, now: float) -> None:
        """Once a loop tick: take back what was not answered in time, retry queued answers."""
        if self.inbox_paused and self.inbox is not None:
            try:
                self.host.epoll.register(self.inbox.fileno(), select.EPOLLIN)
                self.inbox_paused = False
            except OSError:  # still short of kernel memory: next tick
                pass
        for channel in list(self.channels.values()):
            if channel.outbox:
                self._flush(channel)
            if any(now > deadline + PATIENCE for _, deadline in channel.flights.values()):
                self._read(channel, now)  # an answer on its way still counts
                self._take_back_overdue(channel, now)

    def _take_back_overdue(self, channel: Channel, now: float) -> None:
        overdue = [ident for ident, (_, deadline) in channel.flights.items() if now > deadline + PATIENCE]
        if not overdue:
            return
        log.warning("worker %d did not answer for %d connections in %.0fs: serving them here",
                    channel.peer, len(overdue), ANSWER_WITHIN + PATIENCE)
        self.resting[channel.peer] = now + REST_FOR
        for ident in overdue:
            conn, _ = channel.flights.pop(ident)
            self.sent[channel.peer] = max(0, self.sent.get(channel.peer, 0) - 1)
            self.host.resume(conn, now)

    def pending(self) -> bool:
        """Connections in flight, or answers owed: the worker must not exit yet."""
        return any(c.flights or c.outbox for c in self.channels.values())

    def finished(self, now: float) -> bool:
        """Leaving with no connection of our own: answer what senders sent us, read what targets
        answered.  True once nothing is in flight either way and nothing came to us meanwhile."""
        self.stop_receiving()
        taken = self.taken
        for channel in list(self.channels.values()):
            self._read(channel, now)
            if channel.outbox and self._open(channel):
                self._flush(channel)
        return self.taken == taken and not self.pending()

    def _open(self, channel: Channel) -> bool:
        """Still ours (a closed channel's descriptor number may already name a new one)."""
        return self.channels.get(channel.fd) is channel

    def _watch(self, channel: Channel) -> bool:
        """Watch a new channel; False when epoll cannot (ENOMEM, ENOSPC): then it is closed, and
        its other end sees EOF (a sender serves what it sent again, as for any lost channel)."""
        try:
            self.host.epoll.register(channel.fd, select.EPOLLIN)
        except OSError as e:
            log.warning("cannot watch a hand-off channel with worker %d: %s; closing it",
                        channel.peer, e.strerror)
            channel.sock.close()
            return False
        self.channels[channel.fd] = channel
        return True

    def _watch_out(self, channel: Channel, on: bool) -> None:
        if channel.watching_out != on and self._open(channel):
            channel.watching_out = on
            self.host.epoll.modify(channel.fd, select.EPOLLIN | (select.EPOLLOUT if on else 0))


def _unwatch(epoll: select.epoll, fd: int) -> None:
    try:
        epoll.unregister(fd)
    except (OSError, ValueError):
        pass
