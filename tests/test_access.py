"""Issue 11, item 4: access control at accept - allow / deny and max_connections_per_client.

Real daemons on loopback.  Linux routes all of 127.0.0.0/8 to lo, so a client socket bound
to 127.0.0.2 or 127.0.0.3 before connect() is another source address: that is how one test
machine plays several clients.  A refused connection must end in EOF (a FIN: the client
sent nothing before we closed), not a reset, and be counted by cause in `status --json`
(published once per worker tick: waited for, never slept for).
"""

from __future__ import annotations

import socket

import pytest
from helpers import (
    NAME_A,
    NAME_Q,
    admitted,
    ask_on,
    closed_by_server,
    connect,
    holder_of,
    lancelotd_cli,
    served,
    wait_for,
    wait_pool,
    wait_refused,
)

from lancelotd.access import Rules, client_of


def config(workers: int = 1, access: str = "", protocol: str = "") -> str:
    return f"[server]\nworkers = {workers}\n[protocol]\n{protocol}\n[access]\n{access}\n"


# --- the rules, without a daemon -------------------------------------------------------------

def test_rules_order_and_families():
    def permits(rules: Rules, address: str) -> bool:
        client = client_of((address, 1) if "." in address and ":" not in address else (address, 1, 0, 0))
        assert client is not None
        return rules.permits(client)

    rules = Rules(allow=["10.0.0.0/8", "2001:db8::/32"], deny=["10.1.2.3", "2001:db8::bad"])
    assert permits(rules, "10.9.9.9") and permits(rules, "2001:db8::1")
    assert not permits(rules, "10.1.2.3")  # deny wins over allow
    assert not permits(rules, "2001:db8::bad")
    assert not permits(rules, "192.0.2.1") and not permits(rules, "2001:db9::1")  # allow is a whitelist
    assert permits(rules, "::ffff:10.9.9.9") and not permits(rules, "::ffff:10.1.2.3")  # mapped = IPv4
    # deny wins whatever the order of the lists: an allowed address inside a denied block is denied
    assert not permits(Rules(allow=["10.1.2.3"], deny=["10.0.0.0/8"]), "10.1.2.3")
    everyone_but = Rules(allow=[], deny=["::ffff:192.0.2.0/120", "::1"])
    assert not permits(everyone_but, "192.0.2.7") and not permits(everyone_but, "::1")
    assert permits(everyone_but, "192.0.3.7") and permits(everyone_but, "::2")
    assert not permits(Rules(allow=[], deny=["all"]), "::2")


def test_bad_entries_are_refused_with_their_key():
    result_problems = []
    from lancelotd.config import ConfigError, from_dict
    with pytest.raises(ConfigError) as error:
        from_dict({"access": {"allow": ["10.0.0.0/33"], "deny": ["10.0.0.1/8"],
                              "max_connections_per_client": -1}})
    result_problems = error.value.problems
    assert [p.split(":")[0] for p in result_problems] == [
        "access.allow", "access.deny", "access.max_connections_per_client"], result_problems
    assert "10.0.0.1/8" in result_problems[1]


# --- allow / deny at accept ---------------------------------------------------------------

def test_deny_an_ipv4_address(start_daemon):
    d = start_daemon(config=config(access='deny = ["127.0.0.3"]'), workers=1)
    assert not admitted(d.port, "127.0.0.3")
    assert admitted(d.port, "127.0.0.2") and admitted(d.port, "127.0.0.1")
    wait_refused(d.pid_file, denied=1, per_client_limit=0)


def test_allow_a_cidr_block(start_daemon):
    d = start_daemon(config=config(access='allow = ["127.0.0.2/31"]'), workers=1)
    assert admitted(d.port, "127.0.0.2") and admitted(d.port, "127.0.0.3")
    assert not admitted(d.port, "127.0.0.1") and not admitted(d.port, "127.0.0.4")
    wait_refused(d.pid_file, denied=2)


def test_deny_wins_over_allow(start_daemon):
    """The documented order: a denied address is refused even where an allow entry matches it,
    whichever list is written first and however narrow the allow entry is."""
    d = start_daemon(config=config(access='allow = ["127.0.0.3", "127.0.0.0/8"]\n'
                                          'deny = ["127.0.0.2/31"]'), workers=1)
    assert not admitted(d.port, "127.0.0.3") and not admitted(d.port, "127.0.0.2")
    assert admitted(d.port, "127.0.0.4")
    wait_refused(d.pid_file, denied=2)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_rules(start_daemon):
    deny = start_daemon("-b", "[::1]:0", config=config(access='deny = ["::1"]'), workers=1)
    assert not admitted(deny.port, "::1", "::1")
    wait_refused(deny.pid_file, denied=1)
    allow = start_daemon("-b", "[::1]:0", config=config(access='allow = ["::1/128"]\ndeny = ["127.0.0.1"]'),
                         workers=1)
    assert admitted(allow.port, "::1", "::1")


# --- a reload changes the rules, for open connections too ----------------------------------

def test_reload_applies_new_rules_to_open_connections(start_daemon):
    d = start_daemon(config=config(workers=1), workers=1)
    soon_denied, still_allowed = connect(d.port, "127.0.0.2"), connect(d.port, "127.0.0.3")
    with soon_denied, still_allowed:
        assert served(soon_denied) and served(still_allowed)
        d.config_file.write_text(config(workers=1, access='deny = ["127.0.0.2"]'))
        result = lancelotd_cli("reload", "--pid-file", str(d.pid_file))
        assert result.returncode == 0, result.stdout + result.stderr
        # The retired worker hands both over at a question boundary; the new one, with the new
        # rules, closes the one they deny (FIN, not a reset) and serves the other on.
        assert closed_by_server(soon_denied)
        assert served(still_allowed)
        assert ask_on(still_allowed, NAME_Q) == NAME_A
    assert not admitted(d.port, "127.0.0.2") and admitted(d.port, "127.0.0.3")
    wait_refused(d.pid_file, denied=1, denied_open=1)


# --- max_connections_per_client, server-wide ------------------------------------------------

def test_per_client_limit_holds_across_workers(start_daemon):
    """Two workers of at most 2 connections each: 3 connections from one address must span both,
    and a 4th from it is refused though a worker has room - which then takes another address's."""
    d = start_daemon(config=config(workers=2, protocol="max_connections = 2",
                                   access="max_connections_per_client = 3"), workers=2)
    workers = list(wait_pool(d.proc.pid, 2))
    mine = [connect(d.port, "127.0.0.2") for _ in range(3)]
    try:
        assert all(served(sock) for sock in mine)  # answered: accepted and counted
        holders = {holder_of(sock, workers) for sock in mine}
        assert len(holders) == 2, f"the 3 connections are all on one worker: {holders}"
        assert not admitted(d.port, "127.0.0.2")  # over the limit, server-wide
        other = connect(d.port, "127.0.0.3")  # the worker with room takes another address
        with other:
            assert served(other)
            wait_refused(d.pid_file, per_client_limit=1, denied=0)
        mine.pop().close()  # one of ours leaves: its count goes with it
        wait_for(lambda: admitted(d.port, "127.0.0.2"), 10, "a connection from 127.0.0.2 admitted again")
    finally:
        for sock in mine:
            sock.close()


def test_counts_of_a_killed_worker_vanish(start_daemon):
    """A worker SIGKILLed loses its connections: the counts it held must not keep refusing."""
    import os
    import signal

    d = start_daemon(config=config(workers=1, access="max_connections_per_client = 2"), workers=1)
    (worker,) = wait_pool(d.proc.pid, 1)
    mine = [connect(d.port, "127.0.0.2") for _ in range(2)]
    assert all(served(sock) for sock in mine)
    assert not admitted(d.port, "127.0.0.2")
    os.kill(worker, signal.SIGKILL)
    for sock in mine:
        sock.close()
    wait_pool(d.proc.pid, 1, timeout=10)
    wait_for(lambda: admitted(d.port, "127.0.0.2"), 10, "127.0.0.2 admitted by the new worker")


def test_per_client_counts_move_with_a_hand_off(start_daemon):
    """A reload hands the connections to the new generation: their counts go with them, so the
    limit still holds after the old workers have left, and leaves with the connections."""
    d = start_daemon(config=config(workers=1, access="max_connections_per_client = 2"), workers=1)
    (old,) = wait_pool(d.proc.pid, 1)
    mine = [connect(d.port, "127.0.0.2") for _ in range(2)]
    try:
        assert all(served(sock) for sock in mine)
        result = lancelotd_cli("reload", "--pid-file", str(d.pid_file))
        assert result.returncode == 0, result.stdout + result.stderr
        (new,) = wait_pool(d.proc.pid, 1, generation=2)  # the old worker handed over and left
        assert {holder_of(sock, [new]) for sock in mine} == {new} and old != new
        assert not admitted(d.port, "127.0.0.2")
        assert all(served(sock) for sock in mine)
        mine.pop().close()
        wait_for(lambda: admitted(d.port, "127.0.0.2"), 10, "127.0.0.2 admitted once one of its closed")
    finally:
        for sock in mine:
            sock.close()
