"""PROXY protocol v2 listeners in the worker: a connection's life until its header is read.

A mixin of the Worker (worker.py).  A listener with `proxy_protocol = true`
([[listener]] in the config) requires the header from every connection, and
takes it only from `proxy_protocol_from`; no other listener ever parses one
(the spec: never guess whether a header is present).

- At accept, a source outside proxy_protocol_from is closed at once (as
  access.refuse does: a FIN) and counted `proxy_untrusted`.  Not served with
  its socket address, as nginx's set_real_ip_from would: on this listener
  such a client is either misrouted or spoofing, and serving it would mean
  guessing whether its first bytes are a header.
- Otherwise it waits for its header in `self.awaiting`, registered in epoll
  but out of `self.conns`: the loop's hot path misses it and its slow branch
  calls _header_event.  HEADER_TIMEOUT after accept (checked on the tick) it
  is closed, counted `proxy_timeout`; an invalid header, `proxy_invalid`.
  Both close with the lingering close of connections.py, never a reset.
- A complete header: LOCAL (a balancer's health check, counted
  `proxy_local`) is served from the socket's own address; PROXY from the
  client's.  The access rules and the per-client counts (access.py) apply to
  the client's address only: a LOCAL header, or a PROXY header with no
  address (UNSPEC, UNIX), comes from a source in proxy_protocol_from and names
  no client, so it is exempt (an allow-list meant for clients would deny the
  balancer's health checks, and every UNSPEC client would share one quota).
  The address and it goes with the connection: in its Conn (`peer`), in a
  hand-off (rendezvous.HAND), in the recent clients of `status`.  The bytes
  after the header are the client's first read.

All of it once per connection; nothing on the per-question path.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .access import NetSet, client_of, refuse
from .activation import same_address
from .config import Config
from .connections import CLOSE_AFTER_FLUSH, EPOLLIN, OPEN, READ_SLICE, RECV_SIZE, Conn
from .limits import CLIENT_GONE
from .logs import log
from .proxyproto import NEED_MORE, Header, HeaderReader, Invalid
from .scoreboard import DRAINING, STOPPING
from .sockets import describe

if TYPE_CHECKING:
    from .worker import Worker

HEADER_TIMEOUT = 3.0  # the spec: "at least 3 seconds to cover a TCP retransmit"
NOTICE_EVERY = 10.0  # seconds between two warnings of one cause (the others are counted)


def proxied_listeners(cfg: Config, listeners: dict[str, socket.socket]) -> dict[int, tuple[str, ...]]:
    """fd -> proxy_protocol_from of each listener that requires the header, for a worker of `cfg`.

    Matched by address; a socket-activated listener, by the address it is bound to.
    """
    wanted = [(x.bind, x.proxy_protocol_from) for x in cfg.listeners if x.proxy_protocol]
    found = {}
    for address, sock in listeners.items():
        for bind, trusted in wanted:
            if same_address(bind, address):
                found[sock.fileno()] = trusted
                break
    return found


@dataclass(eq=False)
class Awaiting:
    """A connection whose PROXY header is on its way."""

    sock: socket.socket
    fd: int
    addr: tuple  # the socket's peer: the balancer
    deadline: float
    reader: HeaderReader


class Notices:
    """Warnings of one cause at most every NOTICE_EVERY seconds, with the number left unsaid."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.unsaid: dict[str, int] = {}

    def __call__(self, cause: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last.get(cause, -NOTICE_EVERY) < NOTICE_EVERY:
            self.unsaid[cause] = self.unsaid.get(cause, 0) + 1
            return
        self.last[cause] = now
        unsaid = self.unsaid.pop(cause, 0)
        log.warning(message + (f" ({unsaid} more since the last such warning)" if unsaid else ""), *args)


class ProxyHeaders:
    """The Worker's side of PROXY protocol v2 listeners."""

    def _init_proxy_headers(self: Worker, proxied: dict[int, tuple[str, ...]]) -> None:
        self.proxied = {fd: NetSet(trusted) for fd, trusted in proxied.items()}
        self.awaiting: dict[int, Awaiting] = {}
        self.notices = Notices()

    # --- accepting -----------------------------------------------------------

    def _accept_proxied(self: Worker, listener: socket.socket, now: float, most: int) -> None:
        """A PROXY listener is ready: as Accepting._accept, into the header state."""
        if not self.accepting:  # as Accepting._accept
            return
        self.accept_wakeups += 1
        share = self._share()
        accepted, error = self._take_proxied(listener, now, most)
        if error is not None:
            self._pause_accepting(error, now)
        if not accepted:
            self.empty_wakeups += 1
        if self._full() and self.accepting:
            log.warning("at max_connections (%d): not accepting until one closes", self.cfg.max_connections)
            self._stop_accepting()
        elif self.accepting and len(self.conns) + len(self.awaiting) > share:
            self._yield_accepts()  # spread.py; past our share by the end of a wake-up, not within it
        elif accepted:
            self._publish_load()

    def _sweep_proxied(self: Worker, listener: socket.socket, now: float) -> None:
        """The last accept sweep at a stop (retirement.py), for a PROXY listener."""
        _, error = self._take_proxied(listener, now, self.cfg.backlog)
        if error is not None:
            log.warning("last accept sweep stopped: %s", error.strerror)

    def _take_proxied(self: Worker, listener: socket.socket, now: float,
                      most: int) -> tuple[int, OSError | None]:
        """(connections accepted, the error that stopped accepting: out of descriptors)."""
        trusted = self.proxied[listener.fileno()]
        accept = self.acceptors[listener.fileno()]
        accepted = 0
        for _ in range(most):
            if self._full():
                break
            try:
                sock, addr = accept()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in CLIENT_GONE:
                    self.clients_gone += 1
                    continue
                return accepted, e
            client = client_of(addr)
            if client is None or client not in trusted:
                refuse(sock)
                self.counters.proxy_untrusted += 1
                self.notices("untrusted", "closed a connection from %s to PROXY listener %s: "
                             "not in proxy_protocol_from", describe(addr), describe(listener.getsockname()))
                continue
            fd = sock.fileno()
            try:
                self.epoll.register(fd, EPOLLIN)
            except OSError as e:  # ENOMEM, ENOSPC: a want of kernel resources, as EMFILE is
                sock.close()
                return accepted, e
            self.awaiting[fd] = Awaiting(sock, fd, addr, now + HEADER_TIMEOUT, HeaderReader())
            accepted += 1
        self.counters.accepted += accepted
        return accepted, None

    # --- the header ----------------------------------------------------------

    def _header_event(self: Worker, fd: int, now: float) -> None:
        """Bytes (or EOF) from a connection that owes us its header."""
        waiting = self.awaiting[fd]
        try:
            data = waiting.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:  # reset by the client: nothing to close gently
            self._drop_awaiting(waiting)
            return
        if not data:
            if waiting.reader.buffer:  # it began a header and left: a broken sender
                self._header_failed(waiting, "proxy_invalid", "closed in the middle of its header")
            self._drop_awaiting(waiting)  # its side is closed and all it sent is read: a FIN
            return
        result = waiting.reader.feed(data)
        if result is NEED_MORE:
            return
        del self.awaiting[fd]
        if isinstance(result, Invalid):
            self._header_failed(waiting, "proxy_invalid", result.reason)
            self._linger(waiting, now)
        else:
            assert isinstance(result, Header)
            self._header_done(waiting, result, now)

    def _header_done(self: Worker, waiting: Awaiting, header: Header, now: float) -> None:
        """Serve it as a connection from the client's address (LOCAL: the socket's)."""
        if header.local:
            self.counters.proxy_local += 1
        peer = header.source or waiting.addr
        client = 0
        # LOCAL (a health check) and addressless PROXY headers (UNSPEC, UNIX) name no client: the
        # trusted proxy itself speaks, so the client rules and counts do not apply to it.
        if self.gate is not None and header.source is not None:
            refused, client = self.gate.admit(peer)
            if refused:
                setattr(self.counters, refused, getattr(self.counters, refused) + 1)
                log.debug("refused %s (PROXY header from %s): %s", describe(peer), describe(waiting.addr),
                          refused)
                self._linger(waiting, now)
                return
        conn = Conn(waiting.sock, self.table, now, peer)
        conn.client = client
        self.conns[conn.fd] = conn  # already in the epoll set, for input
        self.recent.append(peer)
        if waiting.reader.rest:
            self._first_read(conn, waiting.reader.rest, now)
        if self.state == STOPPING and conn.state == OPEN:
            self._answer_received(conn)  # what it sent is answered, then it is closed
        elif self.state == DRAINING:
            self._hand_off()

    def _first_read(self: Worker, conn: Conn, data: bytes, now: float) -> None:
        """The bytes that came with the header, as the loop would serve a read of them."""
        self.bytes_in += len(data)
        if self.access is not None:
            conn.bytes_in += len(data)
        out, must_close = conn.feed(data, READ_SLICE)
        if not out:
            return
        self.answered += out.count(b".") - must_close
        if conn.held:
            self._want_output(conn)
        conn.last = now
        if not self._send(conn, out):
            return
        if conn.out:
            self._want_output(conn)
        if must_close:
            self._protocol_error(conn, out)

    def _expire_headers(self: Worker, now: float) -> None:
        """On the tick: close the connections whose header did not come in HEADER_TIMEOUT."""
        for waiting in [w for w in self.awaiting.values() if now >= w.deadline]:
            del self.awaiting[waiting.fd]
            self._header_failed(waiting, "proxy_timeout", f"no complete header in {HEADER_TIMEOUT:g}s")
            self._linger(waiting, now)

    def _drop_awaiting(self: Worker, waiting: Awaiting) -> None:
        del self.awaiting[waiting.fd]
        waiting.sock.close()  # also leaves the epoll set
        if self._may_resume_accepting():
            self._start_accepting()

    def _header_failed(self: Worker, waiting: Awaiting, cause: str, why: str) -> None:
        setattr(self.counters, cause, getattr(self.counters, cause) + 1)
        self.notices(cause, "closed a connection from %s on a PROXY listener: %s",
                     describe(waiting.addr), why)

    def _linger(self: Worker, waiting: Awaiting, now: float) -> None:
        """Close it without a reset: the lingering close of connections.py reads what still comes."""
        conn = Conn(waiting.sock, self.table, now, waiting.addr)
        conn.state = CLOSE_AFTER_FLUSH
        self.conns[conn.fd] = conn
        self._close(conn)
