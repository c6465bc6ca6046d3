"""Several hosts behind HAProxy (issue 12): a cluster in network namespaces on this machine.

Three lancelotd hosts, HAProxy from Debian running the shipped etc/haproxy/lancelotd.cfg, and a
closed-loop load with one retry (the protocol's client contract) in a client namespace;
tests/cluster.py builds it.  Root only (skipped otherwise, or without `ip`/`haproxy`).  Each
scenario prints its figures: `pytest -s tests/test_scaleout.py` shows them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import time
from collections.abc import Callable, Iterator

import pytest
from cluster import HAPROXY_CFG, HOSTS, REPO, UP, Cluster, cannot_build, run
from helpers import gone, read, scaled, wait_for

pytestmark = pytest.mark.scaleout

DROP_IN = REPO / "etc" / "haproxy" / "haproxy.service.d" / "lancelotd-state.conf"

# HAProxy sends a PROXY v2 header (the shipped config's default), and each host's service
# listener expects one from HAProxy (198.18.0.1) alone: every scenario runs through it, and the
# last test checks its effect.
PROXY_V2 = True

AGENT_INTER = 1.0  # etc/haproxy/lancelotd.cfg: agent-inter 1s
DRAIN_DELAY = 2.0  # >= agent-inter + 1 s, as the README asks

HOST_TOML = f"""\
[server]
workers = 1
[balancer]
agent_bind = "{{address}}:1061"
drain_delay = {DRAIN_DELAY}
drain_spread = 2.0
[[listener]]
bind = "{{address}}:1060"
proxy_protocol = {str(PROXY_V2).lower()}
""" + ('proxy_protocol_from = ["198.18.0.1/32"]\n' if PROXY_V2 else "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = cannot_build()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("cluster")
    tmp.chmod(0o755)  # HAProxy's workers run as user haproxy
    cl = Cluster(tmp, HOST_TOML, {"LANCELOT_LB_PROXY": "on" if PROXY_V2 else "off"})
    try:
        try:
            cl.build()
        except RuntimeError as e:
            if "netns add" in str(e):
                pytest.skip(f"cannot create network namespaces here: {e}")
            raise
        cl.start()
        yield cl
    finally:
        cl.destroy()


@pytest.fixture(autouse=True)
def hosts_back(request: pytest.FixtureRequest) -> None:
    """Before each test on the cluster: all three hosts running, undrained, UP and ready, so a
    scenario that failed half-way (a host left stopped or drained) fails alone, not every later one."""
    if "cluster" not in request.fixturenames:
        return
    put_back = request.getfixturevalue("cluster").restore()
    if put_back:
        print(f"\n[scaleout] put back before {request.node.name}: {', '.join(put_back)}")


def figures(name: str, summary: dict, **more: object) -> None:
    """The scenario's figures, for the closing note of issue 12 (shown with pytest -s)."""
    keys = ("answers", "errors", "first_attempt_failures", "retried_ok", "reconnects", "connections",
            "max_latency_s", "kinds", "first_kinds")
    print(f"\n[scaleout] {name}: " + json.dumps({**{k: summary[k] for k in keys}, **more}))


def sd_sessions(cl: Cluster, since: int) -> int:
    """Sessions HAProxy logged as ended by the server before it answered (`SD`), since offset."""
    return len(re.findall(r" SD-- ", read(cl.haproxy_log)[since:]))


def ratio(counts: list[int]) -> float:
    return max(counts) / max(min(counts), 1)


def sessions(cl: Cluster, column: str) -> list[int]:
    rows = cl.stat()
    return [int(rows[f"h{n}"][column]) for n in HOSTS]


RETRIES = ("econ", "wretr", "wredis")  # show stat: failed connects to a host, retries, redispatches


def roll(cl: Cluster, name: str, step: Callable[[Cluster, int], None], think: float = 0.0) -> dict:
    """Run `step` on each host in turn under 30 persistent + 6 per-request clients; the load's
    summary plus what HAProxy counted meanwhile (failed connects, retries, `SD` sessions)."""
    log_at = len(read(cl.haproxy_log))
    before = {column: sum(sessions(cl, column)) for column in RETRIES}
    start = time.monotonic()
    with cl.load(persistent=30, per_request=6, think=think) as load:
        for n in HOSTS:
            step(cl, n)
        summary = load.finish()
    haproxy = {column: sum(sessions(cl, column)) - before[column] for column in RETRIES}
    haproxy["SD"] = sd_sessions(cl, log_at)
    figures(name, summary, think=think, seconds=round(time.monotonic() - start, 1), haproxy=haproxy)
    return {**summary, "haproxy": haproxy}


# --- the configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("proxy", ["on", "off"])
def test_shipped_config_passes_haproxy_check(tmp_path, proxy):
    if cannot_build():
        pytest.skip(cannot_build())
    result = run("haproxy", "-c", "-f", str(HAPROXY_CFG), check=False, env={
        "LANCELOT_LB_SOCK": str(tmp_path / "admin.sock"), "LANCELOT_LB_STATE": str(tmp_path / "state"),
        "LANCELOT_LB_PROXY": proxy})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout


# --- the scenarios ----------------------------------------------------------------------------------

def test_restore_puts_every_host_back(cluster):
    """What a failed scenario may leave behind - h1 drained, h2 half-way through a TERM, h3's
    processes SIGSTOPped - is put back by Cluster.restore (the `hosts_back` fixture's): every
    host running, undrained, UP and ready in HAProxy, and clients answered without an error."""
    assert cluster.lancelotd(1, "drain").returncode == 0
    stopping = cluster.host_pid(2)
    os.kill(stopping, signal.SIGTERM)
    wait_for(lambda: "TERM: the agent and /ready say drain" in cluster.host_log(2), 10, "h2 stopping")
    group = os.getpgid(cluster.host_pid(3))
    os.killpg(group, signal.SIGSTOP)
    try:
        put_back = cluster.restore()
    finally:
        os.killpg(group, signal.SIGCONT)
    # (h2 may have finished its stop before restore reached it, or be waited for: either way, started)
    assert {"h1 undrained", "h2 started", "h3 continued"} <= set(put_back), put_back
    assert gone(stopping) and cluster.host_pid(2) != stopping
    for n in HOSTS:
        row = cluster.servers()[f"h{n}"]
        assert int(row["srv_op_state"]) == UP and int(row["srv_admin_state"]) == 0, row
        report = json.loads(cluster.lancelotd(n, "status", "--json").stdout)
        assert report["state"] == "running" and report["balancer"]["state"] == "ready", report
    with cluster.load(persistent=6, per_request=3, think=0.01) as load:
        wait_for(lambda: load.answers() >= 300, 20, "300 answers through HAProxy")
        summary = load.finish()
    assert summary["errors"] == 0, summary
    assert cluster.restore() == []  # nothing left to put back



def test_spread_across_hosts(cluster):
    """leastconn: persistent connections and one-question connections split evenly."""
    with cluster.load(persistent=30, per_request=0, think=0.01) as load:
        def all_in() -> list[int] | None:
            counts = sessions(cluster, "scur")
            return counts if sum(counts) == 30 else None
        persistent = wait_for(all_in, 10, "30 sessions in HAProxy")
        summary = load.finish()
    before = sessions(cluster, "stot")
    # A short think time keeps the machine from saturating: leastconn favours the host that
    # answers fastest, and on a busy CI box that is a scheduling accident, not the balancer.
    with cluster.load(persistent=0, per_request=6, think=0.002) as load:
        time.sleep(3)  # the observation window
        per_request_summary = load.finish()
    per_request = [after - b for after, b in zip(sessions(cluster, "stot"), before, strict=True)]
    figures("spread, persistent", summary, per_host=persistent)
    figures("spread, per-request", per_request_summary, per_host=per_request)
    assert ratio(persistent) <= 1.25, persistent
    assert ratio(per_request) <= 1.25, per_request
    assert summary["errors"] == per_request_summary["errors"] == 0


def usr2_step(cl: Cluster, n: int) -> None:
    """New code in place: USR2, then wait until the old master has handed over and exited."""
    old = cl.host_pid(n)
    os.kill(old, signal.SIGUSR2)
    wait_for(lambda: gone(old) and cl.host_pid(n) != old, 30, f"h{n}'s new master to take over")
    cl.wait_server(n, ready=True)


def test_usr2_roll_loses_nothing(cluster):
    """USR2 on each host in turn, no drain: connections are handed over, clients notice nothing."""
    summary = roll(cluster, "USR2 roll", usr2_step)
    assert summary["errors"] == 0, summary
    assert summary["first_attempt_failures"] == 0, summary
    assert summary["reconnects"] == 0, summary
    assert summary["haproxy"] == {"econ": 0, "wretr": 0, "wredis": 0, "SD": 0}, summary


def drain_step(cl: Cluster, n: int) -> None:
    """Host maintenance as README "Several hosts" has it: drain, stop, start, undrain."""
    result = cl.lancelotd(n, "drain")
    assert result.returncode == 0, result.stdout + result.stderr
    cl.wait_server(n, ready=False, timeout=AGENT_INTER + 2)
    wait_for(lambda: sessions(cl, "scur")[n - 1] == 0, 15, f"h{n}'s sessions to move")
    result = cl.lancelotd(n, "stop")
    assert result.returncode == 0, result.stdout + result.stderr
    cl.start_host(n)
    cl.wait_server(n, up=True, ready=False)  # back drained: the drain file outlives the stop
    result = cl.lancelotd(n, "undrain")
    assert result.returncode == 0, result.stdout + result.stderr
    cl.wait_server(n, ready=True)


def test_drain_roll_loses_no_question(cluster):
    """drain -> stop -> start -> undrain on each host: clients that retry once lose nothing."""
    summary = roll(cluster, "drain roll", drain_step)
    assert summary["errors"] == 0, summary
    assert summary["haproxy"] == {"econ": 0, "wretr": 0, "wredis": 0, "SD": 0}, summary


def term_step(cl: Cluster, n: int) -> None:
    """`systemctl restart`: TERM to the master (no drain first), start again."""
    pid = cl.host_pid(n)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: gone(pid), DRAIN_DELAY + 15, f"h{n}'s master to exit")
    cl.start_host(n)
    cl.wait_server(n, ready=True)


def test_term_roll_with_drain_delay_loses_no_question(cluster):
    """TERM with drain_delay: the agent says drain at once, the listener closes after HAProxy stopped
    sending, so clients that retry once lose nothing even without an explicit drain."""
    summary = roll(cluster, "TERM roll with drain_delay", term_step)
    assert summary["errors"] == 0, summary
    # HAProxy stopped choosing the host before its listener closed: no connect was refused,
    # so no client waited for HAProxy's retry (1 s with leastconn).
    assert summary["haproxy"] == {"econ": 0, "wretr": 0, "wredis": 0, "SD": 0}, summary


def test_hung_host_taken_out(cluster):
    """A host whose processes are all SIGSTOPped (the kernel still completes handshakes) is marked
    DOWN by the protocol check within 3.5 s; its sessions are cut and their clients retry."""
    with cluster.load(persistent=30, per_request=6) as load:
        pid = cluster.host_pid(2)
        group = os.getpgid(pid)
        assert group != os.getpgid(0), "the host must run in its own process group"
        os.killpg(group, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            wait_for(lambda: int(cluster.servers()["h2"]["srv_op_state"]) != UP, 10, "HAProxy to see h2 DOWN")
            detected = time.monotonic() - stopped
        finally:
            os.killpg(group, signal.SIGCONT)
        cluster.wait_server(2, ready=True)
        summary = load.finish()
    figures("SIGSTOP of h2", summary, detected_s=round(detected, 3))
    assert detected < scaled(3.5)
    assert summary["errors"] == 0, summary
    assert summary["max_latency_s"] < scaled(4.0), summary


def systemd_command(line: str, env: dict[str, str]) -> list[str]:
    """An Exec line of a unit as systemd runs it: ${NAME} replaced, $$ a literal $, then words."""
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line).replace("$$", "$")
    return shlex.split(expanded)


def worker_pid(cl: Cluster) -> str | None:
    """The PID of the HAProxy worker that answers the runtime API."""
    found = re.search(r"^Pid: (\d+)", cl.api("show info"), re.M)
    return found.group(1) if found else None


def test_haproxy_reload_keeps_a_down_host_down(cluster):
    """The drop-in's dump before a reload: the new HAProxy process starts with h3 DOWN and sends it
    no connection (without it, h3 is UP for the first checks and leastconn sends it the most)."""
    if shutil.which("socat") is None:
        pytest.skip("the drop-in needs socat (apt-get install socat)")
    dump = [line.removeprefix("ExecReload=") for line in DROP_IN.read_text().splitlines()
            if line.startswith("ExecReload=/bin/sh")]
    assert len(dump) == 1, "one ExecReload= line dumps the state"
    pid = cluster.host_pid(3)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: gone(pid), DRAIN_DELAY + 15, "h3's master to exit")
    cluster.wait_server(3, up=False)
    try:
        with cluster.load(persistent=0, per_request=6) as load:
            env = {"LANCELOT_LB_SOCK": str(cluster.admin_sock), "LANCELOT_LB_STATE": str(cluster.state_file)}
            result = run(*systemd_command(dump[0], env), check=False)
            assert result.returncode == 0 and not result.stderr, result.stderr
            old = worker_pid(cluster)
            os.kill(cluster.haproxy.pid, signal.SIGUSR2)  # what the drop-in's last line does
            wait_for(lambda: worker_pid(cluster) not in (old, None), 10, "the new HAProxy worker to answer")
            first = cluster.servers()["h3"]["srv_op_state"]
            time.sleep(1.5)  # observation window: the new process's first checks
            refused = int(cluster.stat()["h3"]["econ"])
            summary = load.finish()
    finally:
        cluster.start_host(3)
        cluster.wait_server(3, ready=True)
    figures("HAProxy reload with h3 stopped", summary, h3_op_state_at_start=first, h3_econ=refused)
    assert first == "0", "the new process believed h3 UP"
    assert refused == 0
    assert summary["errors"] == 0, summary


def test_proxy_v2_client_address_in_status(cluster):
    """Through HAProxy's PROXY v2 header a host knows the client (198.18.0.2), not HAProxy; HAProxy's
    own health checks come as LOCAL headers, counted apart."""
    with cluster.load(persistent=6, per_request=0, think=0.2):
        reports = [json.loads(cluster.lancelotd(n, "status", "--json").stdout) for n in HOSTS]
    clients = [c for r in reports for w in r["workers"] for c in w["recent_clients"]]
    assert any(re.match(r"\[?198\.18\.0\.2\]?(:\d+)?$", c) for c in clients), clients
    assert all(r["totals"]["proxy"]["local"] > 0 for r in reports), [r["totals"]["proxy"] for r in reports]
    assert all(r["totals"]["proxy"]["invalid"] == 0 and r["totals"]["proxy"]["untrusted"] == 0
               for r in reports), [r["totals"]["proxy"] for r in reports]
