"""`lancelotd` command line (docs/PROMISES.md §4): serve, check-config, status, stop, reload, reopen-logs,
drain, undrain."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable

import psutil
from setproctitle import getproctitle

from . import __version__, activation, agent, checks, config, logs, pidfile, privileges, refusals, status
from .logs import log
from .logs import setup as setup_logging
from .scoreboard import Scoreboard, ScoreboardError
from .sockets import parse_address

SYSTEM_CONFIG = "/etc/lancelotd/lancelotd.toml"
COMMANDS = ("serve", "check-config", "status", "stop", "reload", "reopen-logs", "drain", "undrain")
DRAIN_WAIT = 5.0  # the master sees the drain file within one loop turn (0.5 s)


def default_config_path() -> str | None:
    """$LANCELOTD_CONFIG, else the installed config if there is one, else built-in defaults."""
    path = os.environ.get("LANCELOTD_CONFIG")
    if path:
        return path
    return SYSTEM_CONFIG if os.path.exists(SYSTEM_CONFIG) else None


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return int(text)


def overrides(p: argparse.ArgumentParser) -> None:
    """The options that override the file's settings (serve; check-config shows their effect)."""
    p.add_argument("-b", "--bind", action="append", type=_address, metavar="HOST:PORT",
                   help="listen here instead of the config's addresses (repeatable; [::1]:PORT for IPv6, "
                   "unix:PATH for a UNIX socket)")
    p.add_argument("-w", "--workers", type=_positive, metavar="N", help="number of worker processes")
    p.add_argument("--pid-file", metavar="PATH", help="PID file ('' for none)")
    p.add_argument("--log-file", metavar="PATH", help="log to this file instead of stderr")
    p.add_argument("--log-level", choices=checks.LOG_LEVELS, help="log level")
    p.add_argument("-u", "--user", metavar="USER",
                   help="run the workers as this user (master started as root; it stays root)")
    p.add_argument("-g", "--group", metavar="GROUP", help="the workers' group (default: the user's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lancelotd",
        description="Preforking daemon for the Lancelot question/answer protocol. "
        "With no command, runs 'serve'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", metavar="FILE",
                       help=f"config file (default: $LANCELOTD_CONFIG, else {SYSTEM_CONFIG} if it exists, "
                       "else built-in defaults)")

    serve = sub.add_parser("serve", help="run the master and its workers (the default)")
    with_config(serve)
    overrides(serve)
    serve.add_argument("--daemon", action="store_true",
                       help="detach into the background (returns once the master is listening)")

    check = sub.add_parser("check-config", help="validate a config file: 'ok' or every problem; with "
                           "serve's options, the file with them applied")
    with_config(check)
    overrides(check)
    check.add_argument("-T", "--print", action="store_true", dest="print_config",
                       help="print the effective configuration as TOML (defaults included, where each "
                       "value came from as a comment)")

    status = sub.add_parser(
        "status", help="show the master and every worker (exit 0 running, 1 dead, 3 stopped, 4 unknown)")
    stop = sub.add_parser("stop", help="stop the running master (graceful; waits until it has exited)")
    reload = sub.add_parser("reload", help="reload the config (SIGHUP); waits until the new workers serve")
    reopen = sub.add_parser("reopen-logs", help="make every process reopen its log file (SIGUSR1), "
                            "for logrotate: only a live lancelotd master named by the PID file is signalled")
    drain = sub.add_parser("drain", help="tell load balancers to send no more connections: the agent port "
                           "and /ready say drain, connections close at idle points; kept across restarts")
    undrain = sub.add_parser("undrain", help="end `lancelotd drain`: the agent port says ready again")
    for p in (status, stop, reload, reopen, drain, undrain):
        with_config(p)
        p.add_argument("--pid-file", metavar="PATH", help="the master's PID file (default: the config's)")
    status.add_argument("--json", action="store_true", help="machine-readable output (schema in the README)")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until ^C")
    for p, default in ((stop, 60.0), (reload, 60.0), (drain, DRAIN_WAIT), (undrain, DRAIN_WAIT)):
        more = ", or drain_delay + graceful_timeout + 10 if longer" if p is stop else ""
        p.add_argument("--timeout", type=float, help=f"seconds to wait ({default:g}{more})")
        p.add_argument("--no-wait", action="store_true", help="send the signal and return at once")
        p.set_defaults(timeout_default=default)
    stop.add_argument("--fast", action="store_true", help="fast stop (SIGQUIT) instead of graceful")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except BrokenPipeError:  # `lancelotd status | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except refusals.NotConfigured as e:
        print("\n".join(refusals.not_configured_lines(e)), file=sys.stderr)
        return refusals.NOT_CONFIGURED
    except refusals.Refused as e:
        print(e, file=sys.stderr)
        return e.code
    except (PermissionError, psutil.AccessDenied) as e:  # the last word: one line, never a traceback
        print(f"lancelotd: {args.command}: not allowed: {e}: {refusals.instead(args.command, None)}",
              file=sys.stderr)
        return refusals.NO_PRIVILEGE


def dispatch(args: argparse.Namespace) -> int:
    return {"serve": cmd_serve, "check-config": cmd_check_config, "status": cmd_status, "stop": cmd_stop,
            "reload": cmd_reload, "reopen-logs": cmd_reopen_logs, "drain": cmd_drain,
            "undrain": cmd_drain}[args.command](args)


def load_config(args: argparse.Namespace, base_dir: str | None = None) -> config.Config:
    return config.load(args.config if args.config is not None else default_config_path(), base_dir)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = config_loader(args)()
    except config.ConfigError as e:
        for problem in e.problems:
            print(f"{e.path}: {problem}", file=sys.stderr)
        return 1
    for line in activation.check_environment(cfg.addresses):  # the daemon would start: warnings only
        print(f"lancelotd: warning: {line}", file=sys.stderr)
    if args.print_config:
        from .effective import OPTIONS, render

        data = config.read_toml(cfg.path) if cfg.path else {}
        given = {name: getattr(cfg, name) for name in OPTIONS if getattr(args, name) is not None}
        sys.stdout.write(render(cfg, data, given))
        return 0
    print("ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .arbiter import Arbiter, StartError
    from .daemonize import detach
    from .launcher import ENV_READY_FD

    # setproctitle takes over the memory of argv and the environment only as exec left it, so let
    # it do so before anything removes a variable: with LISTEN_PID first in a socket-activated
    # environment, popping it left every process title unset.
    getproctitle()
    configure = config_loader(args)
    try:
        cfg = configure()
        logs.file_owner = privileges.prepare(cfg.user, cfg.group)  # before the log file is made
        setup_logging(cfg.log_file, cfg.log_level, cfg.log_format)
    except config.ConfigError as e:
        return start_failed([f"{e.path}: {problem}" for problem in e.problems])
    except privileges.PrivilegeError as e:
        return start_failed([f"cannot run the workers as configured: {e}"])
    except OSError as e:
        return start_failed([f"cannot open log file {cfg.log_file}: {e.strerror}"])
    arbiter = Arbiter(cfg, configure)
    try:
        arbiter.prepare()
        if args.daemon and ENV_READY_FD not in os.environ:  # (a USR2 re-exec is detached already)
            code = detach([*(s.fileno() for s in arbiter.listeners.values()), *logs.open_fds()])
            if code is not None:
                return code
        arbiter.start()
    except StartError as e:
        log.error("%s", e)
        # On stderr too when the log goes to a file: the operator at the terminal sees it.
        return start_failed([str(e)] if cfg.log_file else [], str(e), arbiter.ready_fd)
    except Exception as e:  # a bug: its traceback goes to the log, which --daemon keeps
        log.exception("cannot start")
        return start_failed([f"cannot start: {e!r}"] if cfg.log_file else [], repr(e), arbiter.ready_fd)
    return arbiter.run()


def config_loader(args: argparse.Namespace) -> Callable[[], config.Config]:
    """A function giving the config file with the command line's options on top.

    The master calls it again on every reload.  Paths are made absolute
    against the start directory, so they mean the same after --daemon's
    chdir("/").
    """
    start_dir = os.getcwd()

    def absolute(path: str) -> str:
        return path and os.path.join(start_dir, path)

    if args.config:
        args.config = absolute(args.config)

    def configure() -> config.Config:
        cfg = load_config(args, start_dir).with_overrides(
            bind=args.bind, workers=args.workers, pid_file=args.pid_file,
            log_file=args.log_file, log_level=args.log_level, user=args.user, group=args.group,
        )
        access = cfg.access_log if cfg.access_log == "stderr" else absolute(cfg.access_log)
        return cfg.with_overrides(pid_file=absolute(cfg.pid_file), log_file=absolute(cfg.log_file),
                                  drain_file=absolute(cfg.drain_file), access_log=access)

    return configure


def start_failed(lines: list[str], reason: str = "", ready_fd: int | None = None) -> int:
    """Say why serve could not start: on stderr, and to whoever waits on the ready pipe."""
    from .daemonize import report_failure

    for line in lines:
        print(f"lancelotd: {line}", file=sys.stderr)
    report_failure(reason or "; ".join(lines), ready_fd)
    return 1


def pid_file_of(args: argparse.Namespace) -> str:
    if args.pid_file is not None:
        return args.pid_file
    return config_of(args).pid_file


def config_of(args: argparse.Namespace) -> config.Config:
    """The config, for where the master is: an invalid one is said as such (exit 6), never taken
    for the defaults, which would look for another PID file and say "not running"."""
    try:
        return load_config(args)
    except config.ConfigError as e:
        raise refusals.NotConfigured(e.path, e.problems) from None


def timeout_of(args: argparse.Namespace) -> float:
    return args.timeout if args.timeout is not None else args.timeout_default


def cmd_status(args: argparse.Namespace) -> int:
    try:
        pid_file = pid_file_of(args)
    except refusals.NotConfigured as e:
        if args.json:
            print(json.dumps({"schema": status.SCHEMA, "state": "not_configured", "problem": str(e)}))
        raise
    return status.run(pid_file, args.json, args.watch)


def find_master(args: argparse.Namespace) -> tuple[psutil.Process, Scoreboard] | int:
    """The running master and its scoreboard, or the exit code after saying why not."""
    try:
        return status.find_master(pid_file_of(args))
    except status.StatusError as e:
        print(status.explain(e, args.command), file=sys.stderr)
        return e.code


def cmd_reload(args: argparse.Namespace) -> int:
    found = find_master(args)
    if isinstance(found, int):
        return found
    proc, board = found
    try:
        return wait_reload(args, proc, board)
    except ScoreboardError as e:
        print(f"lancelotd: {e}", file=sys.stderr)
        return status.UNKNOWN
    finally:
        board.close()


def wait_reload(args: argparse.Namespace, proc: psutil.Process, board: Scoreboard) -> int:
    """HUP the master and wait for its verdict (header and message read as one record)."""
    before = board.read_header().reloads
    refusals.send("reload", proc, signal.SIGHUP)
    if args.no_wait:
        print(f"sent SIGHUP to master {proc.pid}")
        return 0
    deadline = time.monotonic() + timeout_of(args)
    while True:
        header, message = board.read_reload_result()
        if header.reloads > before and not header.reload_pending:
            break
        if not is_alive(proc):
            print(f"lancelotd: master {proc.pid} exited during the reload", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print(f"lancelotd: reload not finished after {timeout_of(args):g}s", file=sys.stderr)
            return 1
        time.sleep(0.02)
    if header.last_reload_ok:
        print(f"reloaded: {message}")
        return 0
    print(f"lancelotd: reload failed: {message}", file=sys.stderr)
    return 1


def cmd_reopen_logs(args: argparse.Namespace) -> int:
    """USR1 to the master the PID file names, once psutil has checked it is one (not `kill $(cat ...)`
    on a file the service user could have written)."""
    try:
        proc = status.find_master_process(pid_file_of(args))
    except status.StatusError as e:
        print(status.explain(e, args.command), file=sys.stderr)
        return 0 if e.code == status.NOT_RUNNING else e.code  # nothing to reopen
    refusals.send("reopen-logs", proc, signal.SIGUSR1)
    print(f"sent SIGUSR1 to master {proc.pid}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    try:  # no scoreboard needed to signal it: one of another layout must not stop `stop`
        proc = status.find_master_process(pid_file_of(args))
    except status.StatusError as e:
        found = upgrading_master(args)
        if found is None:  # LSB: stopping a stopped service succeeds
            print(status.explain(e, args.command), file=sys.stderr)
            return 0 if e.code in (status.NOT_RUNNING, status.DEAD) else e.code
        proc = found
    refusals.send("stop", proc, signal.SIGQUIT if args.fast else signal.SIGTERM)
    if args.no_wait:
        return 0
    timeout = args.timeout
    if timeout is None:  # a graceful stop may take drain_delay + graceful_timeout
        try:
            cfg = config_of(args)
        except refusals.NotConfigured:  # found through --pid-file: the defaults' wait
            cfg = config.Config()
        timeout = max(args.timeout_default, cfg.drain_delay + cfg.graceful_timeout + 10)
    deadline = time.monotonic() + timeout
    while is_alive(proc):
        if time.monotonic() > deadline:
            print(f"lancelotd: master {proc.pid} still running after {timeout:g}s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"stopped master {proc.pid}")
    return 0


def upgrading_master(args: argparse.Namespace) -> psutil.Process | None:
    """The old master named by PIDFILE.oldbin: during an upgrade (USR2) PIDFILE may not be written yet."""
    oldbin = pid_file_of(args) + ".oldbin"
    proc = pidfile.master_process(oldbin)
    if proc is not None:
        print(f"lancelotd: but {oldbin} names master {proc.pid} (an upgrade in progress): stopping it",
              file=sys.stderr)
    return proc


def is_alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (an exited master its parent has not reaped yet)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmd_drain(args: argparse.Namespace) -> int:
    """Create or remove the drain file, then wait until the running master (if any) has seen it."""
    on = args.command == "drain"
    cfg = config_of(args)
    path = agent.drain_file(config.Config(pid_file=pid_file_of(args), drain_file=cfg.drain_file))
    if not path:
        print("lancelotd: no drain file: set balancer.drain_file, or a PID file", file=sys.stderr)
        return 1
    try:
        changed = agent.set_drained(path, on)
    except OSError as e:
        print(f"lancelotd: cannot {'create' if on else 'remove'} {path}: {e.strerror}", file=sys.stderr)
        return 1
    word = "drained" if on else "undrained"
    print(f"{word} ({path} {'created' if on else 'removed'})" if changed else f"already {word} ({path})")
    try:
        proc, board = status.find_master(pid_file_of(args))
    except status.StatusError as e:
        if e.code in (status.NOT_RUNNING, status.DEAD):
            print(f"no master running: it will start {word}")
            return 0
        print(status.explain(e, args.command), file=sys.stderr)
        return e.code
    try:
        return wait_drain(args, proc, board, on)
    except ScoreboardError as e:
        print(f"lancelotd: {e}", file=sys.stderr)
        return status.UNKNOWN
    finally:
        board.close()


def wait_drain(args: argparse.Namespace, proc: psutil.Process, board: Scoreboard, on: bool) -> int:
    if args.no_wait:
        return 0
    deadline = time.monotonic() + timeout_of(args)
    while bool(board.read_header().drained) != on:
        if time.monotonic() > deadline:
            print(f"lancelotd: master {proc.pid} has not seen it after {timeout_of(args):g}s (does it use "
                  "another drain file?)", file=sys.stderr)
            return 1
        time.sleep(0.02)
    answer = (agent.AGENT_DRAIN if board.read_header().balance != agent.READY else agent.AGENT_READY)
    print(f"master {proc.pid}: the agent says {answer.decode().strip()}")
    return 0
