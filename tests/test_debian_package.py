"""The Debian package on a clean Debian 12, under a real systemd: install, reload, upgrade, remove.

The package is built from a copy of the repository (`dpkg-buildpackage -us -uc -b`), twice: as
it is, and with a newer version (a changelog entry and __version__ bumped in the copy), the
upgrade.  A minimal Debian 12 root is made with mmdebstrap from the package registry apt here
uses, once, and cached in CACHE (its apt cache keeps the runtime dependencies' .debs, so the
sandbox, which has a network namespace of its own, installs them without a network).  That root
is the lower layer of a tests/sdsandbox.py sandbox, whose systemd (Debian 12's) boots as PID 1.

Then, as an operator would: `apt-get install ./lancelotd_*.deb` (the unit enabled and started,
port 1060 answers, `systemctl reload`, `lancelotd status`, `man lancelotd`); the upgrade with
`apt-get install` of the newer .deb while persistent clients ask questions on open connections
(the package hands the service over with USR2, as nginx's does: no question fails, no connection
closes, the unit stays active, its MainPID changes); `apt-get remove` (stopped, config kept) and
`apt-get purge` (config and state gone).  A hand-over that fails (an invalid config) leaves the
old master serving.  The figures are printed (`pytest -s`).

Root, dpkg-buildpackage (with the build dependencies: `apt-get build-dep ./`) and mmdebstrap
needed; skipped otherwise, with the reason.  .ci/run installs them.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import pytest
from helpers import REPO, CheckedThread, sandbox_load, scaled
from sdsandbox import Sandbox, booted, unavailable

from lancelotd import __version__

CACHE = Path(os.environ.get("LANCELOTD_TEST_CACHE", "/var/cache/lancelotd-tests"))
# The recipe's version is in the name: a changed recipe makes a new root, never reuses an old one.
ROOT_NAME = "bookworm-root-1"
RUNTIME = ("python3", "python3-daemon", "python3-setproctitle", "python3-psutil", "python3-prometheus-client")
NEWER = f"{__version__}+upgradetest1"
CONFIG = "/etc/lancelotd/lancelotd.toml"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's python3, not a pyenv or venv one


def why_not() -> str | None:
    if reason := unavailable():
        return reason
    for tool in ("dpkg-buildpackage", "mmdebstrap"):
        if shutil.which(tool, path=CLEAN_PATH) is None:
            return f"{tool} is not installed (apt-get install dpkg-dev mmdebstrap; apt-get build-dep ./)"
    return None


SKIP = why_not()
needs_root = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


# --- what runs everywhere: the versions agree --------------------------------------------------

def changelog_version(text: str) -> str:
    return re.match(r"lancelotd \(([^)]+)\)", text).group(1)


def test_debian_changelog_version_is_lancelotd_version() -> None:
    assert changelog_version((REPO / "debian/changelog").read_text()) == __version__


def test_debian_depends_floors_are_pyproject_floors() -> None:
    """pyproject.toml's floors are what Debian 12 ships; debian/control depends on the same."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {re.split(r"[<>=]", d)[0].replace("_", "-"): d.split(">=")[1] for d in deps}
    control = (REPO / "debian/control").read_text()
    for name, floor in floors.items():
        assert f"python3-{name.removeprefix('python-')} (>= {floor})" in control, (name, floor)


# --- building ----------------------------------------------------------------------------------

def copy_source(dest: Path) -> None:
    shutil.copytree(REPO, dest, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache",
        ".ruff_cache", ".hypothesis", "*.pyc", ".pybuild"))
    for leftover in ("debian/lancelotd", "debian/.debhelper", "debian/files", "debian/debhelper-build-stamp"):
        path = dest / leftover
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def bump(src: Path, version: str) -> None:
    """The newer release, as a maintainer makes it: a changelog entry and the same __version__."""
    changelog = src / "debian/changelog"
    maintainer = re.search(r"^ -- (.+?)  ", changelog.read_text(), re.M).group(1)
    entry = (f"lancelotd ({version}) unstable; urgency=medium\n\n  * Test build: the upgrade.\n\n"
             f" -- {maintainer}  {formatdate(localtime=False)}\n\n")
    changelog.write_text(entry + changelog.read_text())
    init = src / "lancelotd/__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text()))


def build(src: Path) -> Path:
    """dpkg-buildpackage -us -uc -b in src; the .deb it writes beside src."""
    env = {**os.environ, "PATH": CLEAN_PATH, "DEB_BUILD_OPTIONS": "nocheck", "DEB_BUILD_PROFILES": "nocheck"}
    result = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=env,
                            capture_output=True, text=True, timeout=scaled(600))
    assert result.returncode == 0, \
        f"dpkg-buildpackage failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    version = changelog_version((src / "debian/changelog").read_text())
    deb = src.parent / f"lancelotd_{version}_all.deb"
    assert deb.exists(), sorted(p.name for p in src.parent.iterdir())
    return deb


# --- the clean Debian 12 root ------------------------------------------------------------------

def debian_root() -> Path:
    """The cached root, made first if missing (under a lock: sessions may run side by side)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / ROOT_NAME
    with open(CACHE / f"{ROOT_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "etc/debian_version").exists():
            make_root(root)
    return root


def make_root(root: Path) -> None:
    """mmdebstrap's minimal Debian 12 with systemd and man-db; the runtime dependencies' .debs
    (recommends included, as a plain `apt-get install` wants them) only downloaded."""
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hook = ('chroot "$1" env -u APT_CONFIG apt-get install --download-only --yes --quiet '
            f'-o APT::Install-Recommends=true {" ".join(RUNTIME)} >/dev/null')
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    cmd = ["mmdebstrap", "--quiet", "--variant=minbase", "--include=systemd,systemd-sysv,man-db",
           "--skip=cleanup/apt", f"--customize-hook={hook}", "bookworm", str(tmp)]
    with open(sources) if sources.exists() else open(os.devnull) as stdin:
        if not sources.exists():
            cmd.append("http://deb.debian.org/debian")
        result = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, timeout=scaled(900),
                                env={**os.environ, "PATH": CLEAN_PATH})
    assert result.returncode == 0, f"mmdebstrap failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    tmp.rename(root)


# --- the fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    started = time.monotonic()
    first = tmp_path_factory.mktemp("deb-current") / "lancelotd"
    copy_source(first)
    second = tmp_path_factory.mktemp("deb-newer") / "lancelotd"
    copy_source(second)
    bump(second, NEWER)
    built = {"current": build(first), "newer": build(second)}
    print(f"\n[debian] two packages built in {time.monotonic() - started:.1f}s")
    return built


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, debs: dict[str, Path]) -> Iterator[Sandbox]:
    started = time.monotonic()
    root = debian_root()
    print(f"[debian] Debian 12 root ready in {time.monotonic() - started:.1f}s ({root})")
    journal = tmp_path_factory.getbasetemp() / "debian-package-journal.txt"
    with booted(tmp_path_factory.mktemp("sdsb-deb"), journal_to=journal, lower=root) as sb:
        assert sb.run("cat", "/etc/debian_version").stdout.startswith("12.")
        for name, deb in debs.items():
            (sb.root / "root/debs" / name).mkdir(parents=True)
            shutil.copy(deb, sb.root / "root/debs" / name / deb.name)
        yield sb


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args[-3:]} exited with {result.returncode}:\n" \
                                   f"{result.stdout[-4000:]}{result.stderr[-4000:]}"
    return result.stdout


def apt_get(sb: Sandbox, *args: str, cwd: str = "/root") -> str:
    """apt-get as an admin types it (in the .deb's directory, for ./FILE), no questions."""
    line = " ".join(args)
    return ok(sb.run("sh", "-c", f"cd {cwd} && DEBIAN_FRONTEND=noninteractive apt-get -y {line} 2>&1",
                     timeout=600))


def main_pid(sb: Sandbox) -> int:
    return int(sb.show("lancelotd.service", "MainPID")["MainPID"])


# --- the tests, in order -----------------------------------------------------------------------

@needs_root
def test_install_enables_starts_and_serves(sandbox: Sandbox) -> None:
    sb = sandbox
    started = time.monotonic()
    apt_get(sb, "install", "./lancelotd_*.deb", cwd="/root/debs/current")
    print(f"[debian] apt-get install took {time.monotonic() - started:.1f}s")
    assert ok(sb.run("sh", "-c", "command -v lancelotd; command -v lancelot")).split() == [
        "/usr/bin/lancelotd", "/usr/bin/lancelot"]
    assert ok(sb.run("lancelotd", "--version")).strip() == f"lancelotd {__version__}"
    for unit in ("lancelotd.service", "lancelotd.socket"):
        assert sb.systemctl("is-enabled", unit).stdout.strip() == "enabled", unit
        assert sb.systemctl("is-active", unit).stdout.strip() == "active", unit
    exec_start = sb.show("lancelotd.service", "ExecStart", "FragmentPath")
    assert "path=/usr/bin/lancelotd" in exec_start["ExecStart"], exec_start
    assert exec_start["FragmentPath"] in ("/lib/systemd/system/lancelotd.service",
                                          "/usr/lib/systemd/system/lancelotd.service"), exec_start
    conffiles = ok(sb.run("dpkg-query", "--showformat=${Conffiles}", "--show", "lancelotd"))
    assert CONFIG in conffiles
    # Port 1060 answers the protocol: the packaged client, and raw bytes (the sandbox's python3).
    out = ok(sb.run("lancelot", "ask", "What is your name?", "What is your quest?"))
    assert out == "My name is Sir Lancelot of Camelot.\nTo seek the Holy Grail.\n"
    connect = f"socket.create_connection(('127.0.0.1', 1060), {scaled(5)})"
    raw = ok(sb.run("python3", "-c", f"import socket; s = {connect}; "
                    "s.sendall(b'What is your favorite color?'); print(s.recv(100).decode())"))
    assert raw.strip() == "Blue."


@needs_root
def test_reload_status_and_man(sandbox: Sandbox) -> None:
    sb = sandbox
    pid = main_pid(sb)
    ok(sb.systemctl("reload", "lancelotd"))
    assert main_pid(sb) == pid
    assert re.match(r"gen 2, ", sb.show("lancelotd.service", "StatusText")["StatusText"])
    status = sb.run("lancelotd", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"master {pid}" in status.stdout
    for page, title in (("lancelotd", "LANCELOTD(8)"), ("lancelotd.toml", "LANCELOTD.TOML(5)"),
                        ("lancelot", "LANCELOT(1)")):
        shown = ok(sb.run("man", "-P", "cat", page))
        assert title in shown and "NAME" in shown, shown[:500]
    assert "SIGUSR2" in ok(sb.run("man", "-P", "cat", "lancelotd"))
    for doc in ("README.md.gz", "copyright", "changelog.gz", "examples/haproxy/lancelotd.cfg",
                "examples/monit/lancelotd", "examples/logrotate/lancelotd"):
        assert (sb.root / "usr/share/doc/lancelotd" / doc).exists(), doc
    assert not (sb.root / "etc/logrotate.d/lancelotd").exists(), \
        "a logrotate snippet for a log file the unit cannot write"


@needs_root
def test_package_upgrade_hands_over_like_usr2(sandbox: Sandbox) -> None:
    sb = sandbox
    ok(sb.run("sh", "-c", f"echo '# kept: the admin changed this file' >> {CONFIG}"))
    old = main_pid(sb)
    clients = 8
    with sandbox_load(sb, persistent=clients, per_request=0) as load:  # every client has had an answer
        before = load.mark()
        states: list[str] = []
        done = threading.Event()
        watcher = CheckedThread(watch_state, sb, states, done, name="unit state watcher")
        watcher.start()
        started = time.monotonic()
        try:
            out = apt_get(sb, "install", "./lancelotd_*.deb", cwd="/root/debs/newer")
        finally:
            done.set()
            watcher.finish(30)
        took = time.monotonic() - started
        after = load.mark()
        time.sleep(1)  # a second more of questions to the new master's workers
        summary = load.finish()
    asked = after[0] - before[0]
    figures = {"questions_during_upgrade": asked, "failed": summary["errors"],
               "connections_opened": summary["connections"], "clients": clients,
               "connections_closed": summary["connections"] - clients,  # each one closed is reopened
               "upgrade_seconds": round(took, 2), "answers_total": summary["answers"],
               "unit_state_samples": len(states)}
    print(f"[debian] package upgrade under load: {json.dumps(figures)}")
    assert "upgraded in place" in out, out
    assert states and set(states) == {"active"}, f"the unit was not active throughout: {states}"
    assert summary["errors"] == 0, summary["samples"]
    assert summary["connections"] == clients, f"connections were reopened: {summary}"
    assert asked > 0, "no question was asked during the upgrade"
    new = main_pid(sb)
    assert new not in (0, old), "systemd does not follow a new master"
    assert sb.systemctl("is-active", "lancelotd.service").stdout.strip() == "active"
    assert sb.show("lancelotd.service", "NRestarts")["NRestarts"] == "0"
    assert not (sb.root / f"proc/{old}").exists(), "the old master is still running"
    assert ok(sb.run("lancelotd", "--version")).strip() == f"lancelotd {NEWER}"
    assert ok(sb.run("dpkg-query", "--showformat=${Version}", "--show", "lancelotd")) == NEWER
    assert "# kept: the admin changed this file" in ok(sb.run("cat", CONFIG)), \
        "the changed conffile was replaced"
    assert "My name is" in ok(sb.run("lancelot", "ask", "What is your name?"))


def watch_state(sb: Sandbox, states: list[str], done: threading.Event) -> None:
    """The unit's ActiveState, sampled until done (each sample a systemctl call inside)."""
    while not done.is_set():
        states.append(sb.systemctl("is-active", "lancelotd.service").stdout.strip())
        done.wait(0.1)  # unscaled: the sampling period


@needs_root
def test_failed_hand_over_with_an_invalid_config_keeps_the_old_master(sandbox: Sandbox) -> None:
    """A new master that cannot start (here: the admin's config is invalid) changes nothing: the
    postinst says so at once, and neither restarts the service (which would not come back)."""
    sb = sandbox
    good = ok(sb.run("cat", CONFIG))
    sb.write(CONFIG, good + "\n[no_such_table]\n")
    pid = main_pid(sb)
    started = time.monotonic()
    out = apt_get(sb, "install", "--reinstall", "./lancelotd_*.deb", cwd="/root/debs/newer")
    took = time.monotonic() - started
    print(f"[debian] reinstall with an invalid config took {took:.1f}s")
    assert "upgrade FAILED" in out and "the old version keeps serving" in out, out
    assert main_pid(sb) == pid
    assert sb.systemctl("is-active", "lancelotd.service").stdout.strip() == "active"
    assert sb.show("lancelotd.service", "NRestarts")["NRestarts"] == "0"
    assert "My name is" in ok(sb.run("lancelot", "ask", "What is your name?"))
    assert took < scaled(30), "the postinst waited for a hand-over that had failed"
    sb.write(CONFIG, good)


@needs_root
def test_remove_stops_and_purge_removes_config_and_state(sandbox: Sandbox) -> None:
    sb = sandbox
    apt_get(sb, "remove", "lancelotd")
    assert sb.systemctl("is-active", "lancelotd.service").stdout.strip() != "active"
    assert sb.systemctl("is-active", "lancelotd.socket").stdout.strip() != "active"
    assert not lancelotd_processes(sb), "lancelotd processes left after remove"
    assert (sb.root / CONFIG.lstrip("/")).exists(), "remove must keep the configuration"
    apt_get(sb, "purge", "lancelotd")
    for path in ("etc/lancelotd", "run/lancelotd", "usr/bin/lancelotd",
                 "etc/systemd/system/multi-user.target.wants/lancelotd.service",
                 "etc/systemd/system/sockets.target.wants/lancelotd.socket"):
        assert not (sb.root / path).exists(), f"/{path} is left after purge"
    status = sb.run("dpkg-query", "--showformat=${Status}", "--show", "lancelotd")
    assert status.returncode != 0 or "not-installed" in status.stdout, status.stdout


def lancelotd_processes(sb: Sandbox) -> list[str]:
    """Command lines of the sandbox's processes that run lancelotd (its /proc, from the host)."""
    found = []
    for cmdline in (sb.root / "proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if "lancelotd" in line:
            found.append(line)
    return found


@needs_root
def test_lintian_finds_no_error_and_no_warning(debs: dict[str, Path]) -> None:
    if shutil.which("lintian", path=CLEAN_PATH) is None:
        pytest.skip("lintian is not installed (apt-get install lintian)")
    changes = sorted(debs["current"].parent.glob("*.changes"))
    assert changes, "dpkg-buildpackage wrote no .changes"
    result = subprocess.run(["lintian", "--fail-on", "error,warning", str(changes[0])], capture_output=True,
                            text=True, timeout=scaled(600), env={**os.environ, "PATH": CLEAN_PATH})
    print(f"[debian] lintian: {result.stdout.strip() or '(nothing)'}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"^[EW]: ", result.stdout, re.M), result.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-v"]))
