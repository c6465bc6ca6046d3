"""A cluster on one machine for tests/test_scaleout.py: network namespaces, HAProxy, lancelotd hosts.

    <prefix>-cl (198.18.0.2)  --veth--+
                                      +-- br0 in <prefix>-lb (198.18.0.1, HAProxy :1060)
    <prefix>-hN (198.18.0.1N) --veth--+   each hN: lancelotd :1060, agent :1061

The layout is README's "Several hosts" (etc/haproxy/lancelotd.cfg).  Addresses exist only
inside the namespaces (198.18.0.0/15 is set aside for benchmarks and never routed); each veth
is created with its far end already in its namespace, so nothing is added to the root
namespace.  The prefix holds our PID, so parallel runs and leftovers do not collide.

HAProxy (Debian's package) runs etc/haproxy/lancelotd.cfg itself in the foreground (`-W -db`),
a child of the test process; the system's haproxy.service is never involved.

The lancelotd hosts (`serve --daemon`) are started through a keeper: a small child process
that is a child subreaper, so every master it starts, and the USR2 successors and restarted
masters of later tests, are its children and reaped by it.  It exists before any test
begins, so the conftest's leak check sees those hosts as the module fixture's, not as
processes a test leaked.  `python cluster.py keeper` runs it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from helpers import (
    LOAD_CLIENT,
    REPO,
    LoadClient,
    become_subreaper,
    gone,
    load_client_timeouts,
    read,
    read_pid,
    scaled,
    wait_for,
)

HAPROXY_CFG = REPO / "etc" / "haproxy" / "lancelotd.cfg"

LB, CLIENT = "198.18.0.1", "198.18.0.2"
HOSTS = {n: f"198.18.0.1{n}" for n in (1, 2, 3)}
PORT, AGENT_PORT = 1060, 1061
UP = 2  # show servers state: srv_op_state 0 DOWN, 1 STARTING, 2 UP, 3 STOPPING
FDRAIN = 0x08  # srv_admin_state bit: drained (by the agent or the runtime API)


def run(*argv: str, check: bool = True, timeout: float = 30, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """`argv` run to its end within scaled(`timeout`), its output captured."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(timeout),
                          stdin=subprocess.DEVNULL, env=None if env is None else dict(os.environ, **env))
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def cannot_build() -> str | None:
    """Why this machine cannot build the cluster (the reason to skip), or None."""
    if os.geteuid() != 0:
        return "needs root: network namespaces (ip netns add) and a veth bridge"
    for tool in ("ip", "haproxy"):
        if shutil.which(tool) is None:
            package = "iproute2" if tool == "ip" else tool
            return f"`{tool}` is not installed (Debian: apt-get install {package})"
    return None


# --- the keeper: runs commands and reaps every orphan they leave --------------------------

def keeper_main() -> int:
    """One JSON command a line on stdin ({"argv": [...], "timeout": s}), one JSON result a line
    ({"rc": N, "out": "..."}); meanwhile every child that exits is reaped.  At EOF it reaps
    what is left (the fixture has killed it) for up to 10 s and exits."""
    become_subreaper()
    exited: dict[int, int] = {}

    def reap() -> bool:
        """Reap every exited child; whether any child is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            exited[pid] = os.waitstatus_to_exitcode(status)

    while True:
        if not select.select([sys.stdin], [], [], 0.05)[0]:  # unscaled: the period of the reaping
            reap()
            continue
        line = sys.stdin.readline()
        if not line:
            break
        request = json.loads(line)
        out = Path(request["out"])
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, str(out), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                   (os.POSIX_SPAWN_DUP2, 1, 2)]
        pid = os.posix_spawnp(request["argv"][0], request["argv"], os.environ, file_actions=actions)
        deadline = time.monotonic() + request["timeout"]
        while pid not in exited and time.monotonic() < deadline:
            reap()
            time.sleep(0.01)
        if pid not in exited:
            os.kill(pid, 9)
            while pid not in exited:
                reap()
                time.sleep(0.01)
        print(json.dumps({"rc": exited.pop(pid), "out": read(out)}), flush=True)
    deadline = time.monotonic() + scaled(10)
    while reap() and time.monotonic() < deadline:
        time.sleep(0.01)
    return 0


class Keeper:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, __file__, "keeper"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=tmp)

    def run(self, argv: list[str], timeout: float = 30) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {"argv": argv, "timeout": scaled(timeout), "out": str(self.tmp / "keeper.out")}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        return answer["rc"], answer["out"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(scaled(15))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- the load client in the client namespace ----------------------------------------------

class Load(LoadClient):
    """lancelot_load.py in the client namespace, with one retry."""

    def __init__(self, cluster: Cluster, persistent: int = 30, per_request: int = 6, think: float = 0.0
                 ) -> None:
        super().__init__(subprocess.Popen(
            cluster.netns("cl", sys.executable, str(LOAD_CLIENT), "--host", LB, "--port", str(PORT),
                          "--persistent", str(persistent), "--per-request", str(per_request),
                          "--retry", "--think", str(think), *load_client_timeouts()),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


# --- the cluster ---------------------------------------------------------------------------

class Cluster:
    def __init__(self, tmp: Path, host_config: str, haproxy_env: dict[str, str]) -> None:
        self.tmp = tmp
        self.prefix = f"lnt{os.getpid()}"
        self.host_config = host_config
        self.haproxy_env = haproxy_env
        self.namespaces: list[str] = []
        self.keeper: Keeper | None = None
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.haproxy_log = tmp / "haproxy.log"
        self.admin_sock = tmp / "admin.sock"
        self.state_file = tmp / "server-state"

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def netns(self, name: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name), *argv]

    # --- building -------------------------------------------------------------------------

    def build(self) -> None:
        remove_leftovers()
        for name in ("lb", "cl", *(f"h{n}" for n in HOSTS)):
            run("ip", "netns", "add", self.ns(name))
            self.namespaces.append(self.ns(name))
            run("ip", "-n", self.ns(name), "link", "set", "lo", "up")  # lo is down in a new netns
        lb = self.ns("lb")
        run("ip", "-n", lb, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", lb, "addr", "add", f"{LB}/24", "dev", "br0")
        run("ip", "-n", lb, "link", "set", "br0", "up")
        peers = [("cl", "vcl", CLIENT), *((f"h{n}", f"vh{n}", a) for n, a in HOSTS.items())]
        for name, veth, address in peers:  # the peer is created inside its namespace
            run("ip", "-n", lb, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                "netns", self.ns(name))
            run("ip", "-n", lb, "link", "set", veth, "master", "br0", "up")
            run("ip", "-n", self.ns(name), "addr", "add", f"{address}/24", "dev", "eth0")
            run("ip", "-n", self.ns(name), "link", "set", "eth0", "up")
        # Thousands of short connections from the client, and from HAProxy to the hosts: the
        # side that closes first keeps TIME_WAIT, so reuse those ports (sysctls are per netns).
        for name in ("cl", "lb"):
            run(*self.netns(name, "sh", "-c", "echo 10000 65000 > /proc/sys/net/ipv4/ip_local_port_range"
                            " && echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse"))
        self.keeper = Keeper(self.tmp)

    def start(self) -> None:
        """Start the hosts and HAProxy; return once HAProxy has every host UP and ready."""
        for n in HOSTS:
            self.start_host(n)
        self.start_haproxy()
        for n in HOSTS:
            self.wait_server(n, ready=True)

    # --- hosts ----------------------------------------------------------------------------

    def host_dir(self, n: int) -> Path:
        path = self.tmp / f"h{n}"
        path.mkdir(exist_ok=True)
        return path

    def pid_file(self, n: int) -> Path:
        return self.host_dir(n) / "lancelotd.pid"

    def start_host(self, n: int) -> int:
        """`lancelotd serve --daemon` in host n's namespace (returns once it listens); its PID."""
        assert self.keeper is not None
        config = self.host_dir(n) / "lancelotd.toml"
        config.write_text(self.host_config.format(address=HOSTS[n]))
        rc, out = self.keeper.run(self.netns(
            f"h{n}", sys.executable, "-m", "lancelotd", "serve", "--daemon", "-c", str(config),
            "--pid-file", str(self.pid_file(n)), "--log-file", str(self.host_dir(n) / "lancelotd.log")))
        assert rc == 0, f"host h{n} did not start: {out}\n{self.host_log(n)}"
        pid = read_pid(self.pid_file(n))
        assert pid, f"host h{n}: no PID file"
        return pid

    def host_pid(self, n: int) -> int:
        pid = read_pid(self.pid_file(n))
        assert pid, f"host h{n}: no PID in {self.pid_file(n)}"
        return pid

    def host_log(self, n: int) -> str:
        return read(self.host_dir(n) / "lancelotd.log")[-3000:]

    def lancelotd(self, n: int, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """`lancelotd ARGS --pid-file <host n's>` from here: /run and /tmp are shared with the netns."""
        config = self.host_dir(n) / "lancelotd.toml"
        return run(sys.executable, "-m", "lancelotd", *args, "-c", str(config), "--pid-file",
                   str(self.pid_file(n)), check=False, timeout=timeout)

    # --- HAProxy ----------------------------------------------------------------------------

    def haproxy_vars(self) -> dict[str, str]:
        """The environment etc/haproxy/lancelotd.cfg reads, for this cluster."""
        return {"LANCELOT_LB_LOG": "stdout", "LANCELOT_LB_SOCK": str(self.admin_sock),
                "LANCELOT_LB_STATE": str(self.state_file), "LANCELOT_LB_MAXCONN": "4000",
                **{f"LANCELOT_H{n}": a for n, a in HOSTS.items()}, **self.haproxy_env}

    def start_haproxy(self) -> None:
        env = dict(os.environ, **self.haproxy_vars())
        with open(self.haproxy_log, "ab") as log:
            self.haproxy = subprocess.Popen(self.netns("lb", "haproxy", "-W", "-db", "-f", str(HAPROXY_CFG)),
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                            start_new_session=True)
        wait_for(lambda: self.haproxy_alive() and self.admin_sock.exists(), 10, "HAProxy's stats socket")

    def haproxy_alive(self) -> bool:
        assert self.haproxy is not None
        if self.haproxy.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.haproxy.returncode}:\n{read(self.haproxy_log)}")
        return True

    def api(self, command: str) -> str:
        """One command on HAProxy's runtime API (the stats socket): its whole answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(scaled(5))
            sock.connect(str(self.admin_sock))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """`show servers state lancelotd`, by server name (h1..): srv_op_state, srv_admin_state..."""
        lines = self.api("show servers state lancelotd").splitlines()
        header = next(line for line in lines if line.startswith("# "))[2:].split()
        rows = [dict(zip(header, line.split(), strict=False)) for line in lines[2:] if line.strip()]
        return {row["srv_name"]: row for row in rows}

    def stat(self) -> dict[str, dict[str, str]]:
        """`show stat` rows of the lancelotd backend's servers, by name: scur, stot, status..."""
        text = self.api("show stat").lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == "lancelotd" and row["svname"] in {f"h{n}" for n in HOSTS}}

    def wait_server(self, n: int, up: bool = True, ready: bool | None = None, timeout: float = 10) -> None:
        """Wait until HAProxy sees host n UP (or DOWN) and, if given, ready (or drained)."""
        def seen() -> bool:
            self.haproxy_alive()
            row = self.servers()[f"h{n}"]
            if (int(row["srv_op_state"]) == UP) != up:
                return False
            return ready is None or (not int(row["srv_admin_state"]) & FDRAIN) == ready
        what = f"HAProxy to see h{n} {'UP' if up else 'DOWN'}" + ("" if ready is None else
                                                              " and ready" if ready else " and drained")
        try:
            wait_for(seen, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}: {self.servers().get(f'h{n}')}\n{self.host_log(n)}") from None

    def load(self, **kwargs: float) -> Load:
        return Load(self, **kwargs)  # type: ignore[arg-type]

    # --- putting it back between tests -------------------------------------------------------

    def restore(self, timeout: float = 30) -> list[str]:
        """Whatever the last test left (a host stopped, drained, SIGSTOPped, mid-upgrade or
        mid-stop; HAProxy told to drain or disable a server), put every host back running,
        undrained, UP and ready in HAProxy.  Returns what had to be put back.  A dead HAProxy is
        not restarted (a process started inside a test is that test's): it fails, with its log."""
        done: list[str] = []
        self.haproxy_alive()
        for n in HOSTS:
            done += self.restore_host(n)
            for command in ("enable agent", "enable health", "set server"):  # undo runtime API changes
                self.api(f"{command} lancelotd/h{n}" + (" state ready" if command == "set server" else ""))
        for n in HOSTS:
            self.wait_server(n, up=True, ready=True, timeout=timeout)
        return done

    def restore_host(self, n: int) -> list[str]:
        done = []
        pid = read_pid(self.pid_file(n))
        try:
            if pid and psutil.Process(pid).status() == psutil.STATUS_STOPPED:  # SIGSTOPped: its group
                os.killpg(os.getpgid(pid), signal.SIGCONT)
                done.append(f"h{n} continued")
        except (psutil.Error, ProcessLookupError):
            pass  # gone: started below
        oldbin = read_pid(Path(f"{self.pid_file(n)}.oldbin"))
        if oldbin and not gone(oldbin):  # an upgrade under way: let it end (its own rules decide)
            wait_for(lambda: gone(oldbin), 60, f"h{n}'s old master {oldbin} to leave")
            done.append(f"h{n}'s upgrade finished")
            pid = read_pid(self.pid_file(n))
        if pid and not gone(pid):
            report = self.lancelotd(n, "status", "--json")
            state = json.loads(report.stdout).get("balancer", {}).get("state") if report.stdout else None
            if state == "stopping":  # a TERM the test sent: let the stop end, then start again
                wait_for(lambda: gone(pid), 60, f"h{n}'s stopping master {pid} to exit")
                done.append(f"h{n} was stopping")
        if not pid or gone(pid):
            self.start_host(n)
            done.append(f"h{n} started")
        if Path(f"{self.pid_file(n)}.drain").exists():
            result = self.lancelotd(n, "undrain")
            assert result.returncode == 0, result.stdout + result.stderr
            done.append(f"h{n} undrained")
        return done

    # --- cleaning up ------------------------------------------------------------------------

    def destroy(self) -> None:
        """Kill everything in our namespaces, reap it, delete the namespaces.  Never raises."""
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()  # TERM to the master-worker stops it all
            try:
                self.haproxy.wait(scaled(10))
            except subprocess.TimeoutExpired:
                os.killpg(self.haproxy.pid, 9)
                self.haproxy.wait()
        for ns in self.namespaces:
            kill_inside(ns)
        if self.keeper is not None:
            self.keeper.close()
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)


def kill_inside(ns: str) -> None:
    """SIGKILL every process in namespace `ns` and wait until none is left."""
    def pids() -> list[int]:
        return [int(p) for p in run("ip", "netns", "pids", ns, check=False).stdout.split()]
    deadline = time.monotonic() + scaled(10)
    while (left := pids()) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_leftovers() -> None:
    """Namespaces of earlier runs whose test process is gone (a crash, a SIGKILLed pytest)."""
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        owner = name[3:].split("-")[0] if name.startswith("lnt") else ""
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            kill_inside(name)
            run("ip", "netns", "del", name, check=False)


if __name__ == "__main__" and sys.argv[1:] == ["keeper"]:
    sys.exit(keeper_main())
