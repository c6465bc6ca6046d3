"""Issue 12, item 5: PROXY protocol v2 listeners, on real daemons on loopback.

The test plays HAProxy: it writes the PROXY v2 header itself (proxyproto.build, checked against
HAProxy's own bytes in test_proxyproto.py), claiming clients in 198.18.0.0/24 while the socket's
peer is 127.0.0.1.  Counts and recent client addresses are read from `status --json` (published
once per worker tick: waited for, never slept for).  A closed connection must end in EOF (a FIN),
never a reset.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
from helpers import (
    NAME_A,
    NAME_Q,
    Daemon,
    ask_on,
    closed_by_server,
    connect,
    lancelotd_cli,
    scaled,
    status_json,
    wait_for,
    wait_log,
    wait_pool,
    wait_refused,
)

from lancelotd.proxyproto import LOCAL, PROXY, build

CLIENT = ("198.18.0.2", 31222)
BALANCER_SIDE = ("198.18.0.1", 1062)
PROXY_LISTENING = r"listening on (\S+):(\d+) \(PROXY protocol v2\)$"


def config(trusted: str = '["127.0.0.1"]', bind: str = "127.0.0.2:0", proxied: bool = True,
           access: str = "", workers: int = 1) -> str:
    options = f"proxy_protocol = true\nproxy_protocol_from = {trusted}\n" if proxied else ""
    return (f"[server]\nworkers = {workers}\n[access]\n{access}\n"
            f"[[listener]]\nbind = \"{bind}\"\n{options}")


def proxy_port(d: Daemon) -> int:
    return int(wait_log(d.log_file, PROXY_LISTENING)[0].group(2))


def proxied(d: Daemon, source: str = "127.0.0.1", host: str = "127.0.0.2") -> socket.socket:
    return connect(proxy_port(d), source, host)


def wait_proxy(d: Daemon, **expected: int) -> dict:
    """Wait until the PROXY counters in status are `expected`; the status."""
    def counted() -> dict | None:
        status = status_json(d.pid_file)
        counts = status["totals"]["proxy"]
        return status if all(counts[name] == n for name, n in expected.items()) else None
    return wait_for(counted, 10, f"status to count {expected}")  # type: ignore[return-value]


def recent_clients(d: Daemon, generation: int | None = None) -> list[str]:
    workers = status_json(d.pid_file)["workers"]
    return [a for w in workers if generation in (None, w["generation"]) for a in w["recent_clients"]]


# --- served, with the client's address ------------------------------------------------------

@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_proxied_connection_is_served_as_its_client(start_daemon, family):
    if family == "ipv4":
        d = start_daemon(config=config(), workers=1)
        header, source, host = build(PROXY, CLIENT, BALANCER_SIDE), "127.0.0.1", "127.0.0.2"
        shown = "198.18.0.2:31222"
    else:
        d = start_daemon(config=config(trusted='["::1"]', bind="[::1]:0"), workers=1)
        header = build(PROXY, ("2001:db8::7", 40000), ("2001:db8::1", 1060), tlvs=b"\x04\x00\x02id")
        source = host = "::1"
        shown = "[2001:db8::7]:40000"
    with proxied(d, source, host) as sock:
        sock.sendall(header + NAME_Q)  # the header and the first question in one segment, as HAProxy does
        assert sock.recv(4096) == NAME_A
        assert ask_on(sock, NAME_Q) == NAME_A
        wait_for(lambda: shown in recent_clients(d), 10, f"{shown} in the recent clients of status")
        assert not any(a.startswith(("127.0.0.1:", "[::1]:")) for a in recent_clients(d))
    wait_proxy(d, local=0, invalid=0, untrusted=0, timeout=0)
    wait_for(lambda: status_json(d.pid_file)["totals"]["answered"] == 2, 10, "both questions counted")


def test_local_header_is_counted_apart_and_served(start_daemon):
    """HAProxy's health check: a LOCAL header, then `tcp-check send What is your name?`."""
    d = start_daemon(config=config(), workers=1)
    with proxied(d) as sock:
        sock.sendall(build(LOCAL) + NAME_Q)
        assert sock.recv(4096) == NAME_A
        port = sock.getsockname()[1]
    wait_proxy(d, local=1, invalid=0)
    assert f"127.0.0.1:{port}" in recent_clients(d)  # LOCAL: the socket's own address


@pytest.mark.parametrize("first_bytes", [
    NAME_Q,  # no header at all: a client sent straight to the balancer's port
    b"PROXY TCP4 198.18.0.2 198.18.0.1 31222 1062\r\n" + NAME_Q,  # version 1
    build(PROXY, CLIENT, BALANCER_SIDE)[:12] + b"\x11" + NAME_Q,  # signature, then version 1
], ids=["missing", "v1", "bad-version"])
def test_missing_or_invalid_header_is_closed_and_counted(start_daemon, first_bytes):
    d = start_daemon(config=config(), workers=1)
    with proxied(d) as sock:
        sock.sendall(first_bytes)
        assert closed_by_server(sock)  # EOF, no answer, no reset
    wait_proxy(d, invalid=1, local=0)
    assert d.ask(NAME_Q) == NAME_A  # the plain listener (-b) never parses a header
    assert "closed a connection from 127.0.0.1" in d.log()


def test_untrusted_source_is_refused(start_daemon):
    d = start_daemon(config=config(trusted='["127.0.0.2/32"]'), workers=1)
    with proxied(d, source="127.0.0.1") as sock:
        sock.sendall(build(PROXY, CLIENT, BALANCER_SIDE) + NAME_Q)
        assert closed_by_server(sock)
    wait_proxy(d, untrusted=1, invalid=0)
    with proxied(d, source="127.0.0.2") as sock:  # the trusted balancer
        sock.sendall(build(PROXY, CLIENT, BALANCER_SIDE) + NAME_Q)
        assert sock.recv(4096) == NAME_A
    assert "not in proxy_protocol_from" in d.log()


def test_header_split_byte_by_byte(start_daemon):
    d = start_daemon(config=config(), workers=1)
    with proxied(d) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in build(PROXY, CLIENT, BALANCER_SIDE) + NAME_Q:
            sock.send(bytes([byte]))
            time.sleep(0.002)  # the load pattern: one segment per byte
        assert sock.recv(4096) == NAME_A
    wait_for(lambda: "198.18.0.2:31222" in recent_clients(d), 10, "the client's address in status")
    wait_proxy(d, invalid=0, timeout=0)


def test_header_timeout(start_daemon):
    d = start_daemon(config=config(), workers=1)
    with proxied(d) as sock:
        sock.sendall(build(PROXY, CLIENT, BALANCER_SIDE)[:20])
        began = time.monotonic()
        assert closed_by_server(sock)
        waited = time.monotonic() - began
    assert 3.0 <= waited < scaled(5.0), f"closed {waited:.2f}s after a partial header"
    wait_proxy(d, timeout=1, invalid=0)


# --- the access rules see the client's address -----------------------------------------------

def test_access_rules_apply_to_the_proxy_address(start_daemon):
    d = start_daemon(config=config(access='deny = ["198.18.0.2"]'), workers=1)
    with proxied(d) as sock:  # the socket's peer, 127.0.0.1, is not denied: the header's source is
        sock.sendall(build(PROXY, CLIENT, BALANCER_SIDE) + NAME_Q)
        assert closed_by_server(sock)
    with proxied(d) as sock:
        sock.sendall(build(PROXY, ("198.18.0.3", 40000), BALANCER_SIDE) + NAME_Q)
        assert sock.recv(4096) == NAME_A
    wait_refused(d.pid_file, denied=1)
    wait_proxy(d, invalid=0, untrusted=0)


def test_per_client_limit_counts_the_proxy_address(start_daemon):
    d = start_daemon(config=config(access="max_connections_per_client = 1"), workers=1)
    with proxied(d) as first, proxied(d) as second, proxied(d) as third:
        first.sendall(build(PROXY, CLIENT, BALANCER_SIDE) + NAME_Q)
        assert first.recv(4096) == NAME_A
        second.sendall(build(PROXY, (CLIENT[0], 40001), BALANCER_SIDE) + NAME_Q)
        assert closed_by_server(second)  # the same client, through the same balancer
        third.sendall(build(PROXY, ("198.18.0.3", 40002), BALANCER_SIDE) + NAME_Q)
        assert third.recv(4096) == NAME_A  # another client, through the same balancer
    wait_refused(d.pid_file, per_client_limit=1, denied=0)


# --- reloads and hand-offs -----------------------------------------------------------------------

def test_the_address_survives_a_hand_off(start_daemon):
    d = start_daemon(config=config(access="max_connections_per_client = 5"), workers=1)
    (old,) = wait_pool(d.proc.pid, 1)
    with proxied(d) as sock:
        sock.sendall(build(PROXY, CLIENT, BALANCER_SIDE) + NAME_Q)
        assert sock.recv(4096) == NAME_A
        result = lancelotd_cli("reload", "--pid-file", str(d.pid_file))
        assert result.returncode == 0, result.stdout + result.stderr
        (new,) = wait_pool(d.proc.pid, 1, generation=2)  # the old worker handed it over and left
        assert new != old
        assert ask_on(sock, NAME_Q) == NAME_A
        wait_for(lambda: "198.18.0.2:31222" in recent_clients(d, generation=2), 10,
                 "the client's address on the generation-2 worker")
        assert not any(a.startswith("127.0.0.1:") for a in recent_clients(d, generation=2))


def test_reload_turns_the_proxy_protocol_on_for_a_kept_listener(start_daemon):
    d = start_daemon(config=config(proxied=False), workers=1)
    port = int(wait_log(d.log_file, r"listening on 127\.0\.0\.2:(\d+)$")[0].group(1))
    with connect(port, host="127.0.0.2") as sock:
        assert ask_on(sock, NAME_Q) == NAME_A  # a plain listener: no header
    d.config_file.write_text(config())
    result = lancelotd_cli("reload", "--pid-file", str(d.pid_file))
    assert result.returncode == 0, result.stdout + result.stderr
    wait_pool(d.proc.pid, 1, generation=2)
    with connect(port, host="127.0.0.2") as sock:  # the same socket (kept), the new generation's setting
        sock.sendall(build(PROXY, CLIENT, BALANCER_SIDE) + NAME_Q)
        assert sock.recv(4096) == NAME_A
    wait_for(lambda: "198.18.0.2:31222" in recent_clients(d, generation=2), 10, "the client's address")


# --- configuration ---------------------------------------------------------------------------------

def test_configuration_problems_name_their_keys(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nbind = ["127.0.0.1:7000"]\n'
                    '[[listener]]\nbind = "127.0.0.1:7001"\nproxy_protocol = true\n'
                    '[[listener]]\nbind = "127.0.0.1:7002"\nproxy_protocol_from = ["10.0.0.0/8"]\n'
                    '[[listener]]\nbind = "127.0.0.1:7000"\n'
                    '[[listener]]\nbind = "127.0.0.1:7003"\nproxy_protocol = true\n'
                    'proxy_protocol_from = ["10.0.0.1/8"]\n')
    result = lancelotd_cli("check-config", "-c", str(path))
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert re.search(r"listener\[0\]\.proxy_protocol_from: required with proxy_protocol = true", out), out
    assert "listener[1].proxy_protocol_from: has no effect without proxy_protocol = true" in out, out
    assert ("listener[2].bind: '127.0.0.1:7000' is the same address as '127.0.0.1:7000' in server.bind"
            in out), out
    assert "listener[3].proxy_protocol_from: '10.0.0.1/8' is not an address or CIDR block" in out, out


# --- issue 19, item 7: IPv6 blocks, and headers that name no client ---------------------------

@pytest.mark.parametrize("prefix", [None, 64])
def test_ipv6_clients_of_one_block_share_a_count_with_a_prefix(start_daemon, prefix):
    """A client rotating addresses in its /64 is one client with max_connections_per_client_ipv6_prefix."""
    setting = f"\nmax_connections_per_client_ipv6_prefix = {prefix}" if prefix else ""
    d = start_daemon(config=config(access=f"max_connections_per_client = 2{setting}"), workers=1)
    balancer = ("2001:db8:ffff::1", 1062, 0, 0)
    answers = []
    socks = [proxied(d) for _ in range(4)]
    try:
        for i, sock in enumerate(socks[:3]):  # three addresses of 2001:db8:1:2::/64
            sock.sendall(build(PROXY, (f"2001:db8:1:2::{i + 1}", 40000 + i, 0, 0), balancer) + NAME_Q)
            answers.append(sock.recv(4096))
        socks[3].sendall(build(PROXY, ("2001:db8:1:3::1", 40009, 0, 0), balancer) + NAME_Q)  # the next /64
        assert socks[3].recv(4096) == NAME_A
    finally:
        for sock in socks:
            sock.close()
    if prefix:
        assert answers[:2] == [NAME_A, NAME_A] and answers[2] == b"", answers
        wait_refused(d.pid_file, per_client_limit=1)
    else:
        assert answers == [NAME_A] * 3
        wait_refused(d.pid_file, per_client_limit=0)


def test_a_local_header_is_exempt_from_the_client_allow_list(start_daemon):
    """HAProxy's health checks (LOCAL) come from the balancer, which a client allow-list leaves out."""
    d = start_daemon(config=config(access='allow = ["198.18.0.0/24"]'), workers=1)
    with proxied(d) as sock:
        sock.sendall(build(LOCAL) + NAME_Q)
        assert sock.recv(4096) == NAME_A
    with proxied(d) as sock:  # a PROXY header without addresses (UNSPEC) names no client either
        sock.sendall(build(PROXY) + NAME_Q)
        assert sock.recv(4096) == NAME_A
    with proxied(d) as sock:  # a real client outside the list is still denied
        sock.sendall(build(PROXY, ("203.0.113.9", 40000), BALANCER_SIDE) + NAME_Q)
        assert closed_by_server(sock)
    wait_refused(d.pid_file, denied=1)


def test_unspec_headers_do_not_share_one_quota(start_daemon):
    d = start_daemon(config=config(access="max_connections_per_client = 1"), workers=1)
    socks = [proxied(d) for _ in range(3)]
    try:
        for sock in socks:
            sock.sendall(build(PROXY) + NAME_Q)
            assert sock.recv(4096) == NAME_A
    finally:
        for sock in socks:
            sock.close()
    wait_refused(d.pid_file, per_client_limit=0)
