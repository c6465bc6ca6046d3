"""`lancelotd` command line (SPEC §5): serve, check-config, stop, reload."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import psutil

from . import __version__, config, logs, pidfile
from .logs import log
from .logs import setup as setup_logging
from .sockets import parse_address

SYSTEM_CONFIG = "/etc/lancelotd/lancelotd.toml"
COMMANDS = ("serve", "check-config", "stop", "reload")


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
    serve.add_argument("-b", "--bind", action="append", type=_address, metavar="HOST:PORT",
                       help="listen here instead of the config's addresses (repeatable; [::1]:PORT for IPv6)")
    serve.add_argument("-w", "--workers", type=_positive, metavar="N", help="number of worker processes")
    serve.add_argument("--pid-file", metavar="PATH", help="PID file ('' for none)")
    serve.add_argument("--log-file", metavar="PATH", help="log to this file instead of stderr")
    serve.add_argument("--log-level", choices=config.LOG_LEVELS, help="log level")
    serve.add_argument("--daemon", action="store_true",
                       help="detach into the background (returns once the master is listening)")

    check = sub.add_parser("check-config", help="validate a config file: 'ok' or every problem")
    with_config(check)

    for name, what in (("stop", "stop the running master (graceful; waits until it has exited)"),
                       ("reload", "tell the running master to reload its config (SIGHUP)")):
        p = sub.add_parser(name, help=what)
        with_config(p)
        p.add_argument("--pid-file", metavar="PATH", help="the master's PID file (default: the config's)")
        if name == "stop":
            p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
            p.add_argument("--fast", action="store_true", help="fast stop (SIGQUIT) instead of graceful")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    return {"serve": cmd_serve, "check-config": cmd_check_config, "stop": cmd_stop,
            "reload": cmd_reload}[args.command](args)


def load_config(args: argparse.Namespace) -> config.Config:
    return config.load(args.config if args.config is not None else default_config_path())


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        load_config(args)
    except config.ConfigError as e:
        for problem in e.problems:
            print(f"{e.path}: {problem}", file=sys.stderr)
        return 1
    print("ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .arbiter import ENV_READY_FD, Arbiter, StartError
    from .daemonize import detach, report_failure

    start_dir = os.getcwd()

    def absolute(path: str) -> str:
        """Paths mean what they meant at start, after --daemon's chdir("/") too."""
        return path and os.path.join(start_dir, path)

    if args.config:
        args.config = absolute(args.config)

    def configure() -> config.Config:
        """The config file with the command line's options on top (again on each reload)."""
        cfg = load_config(args).with_overrides(
            bind=args.bind, workers=args.workers, pid_file=args.pid_file,
            log_file=args.log_file, log_level=args.log_level,
        )
        return cfg.with_overrides(pid_file=absolute(cfg.pid_file), log_file=absolute(cfg.log_file))

    try:
        cfg = configure()
    except config.ConfigError as e:
        for problem in e.problems:
            print(f"lancelotd: {e.path}: {problem}", file=sys.stderr)
        return 1
    try:
        setup_logging(cfg.log_file, cfg.log_level)
    except OSError as e:
        print(f"lancelotd: cannot open log file {cfg.log_file}: {e.strerror}", file=sys.stderr)
        return 1
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
        report_failure(str(e))
        if cfg.log_file:  # the operator at the terminal sees it too
            print(f"lancelotd: {e}", file=sys.stderr)
        return 1
    return arbiter.run()


def _master(args: argparse.Namespace) -> tuple[psutil.Process | None, str]:
    path = args.pid_file
    if path is None:
        path = load_config(args).pid_file
    return pidfile.master_process(path), path


def cmd_reload(args: argparse.Namespace) -> int:
    proc, path = _master(args)
    if proc is None:
        print(f"lancelotd: not running (no live master in PID file {path})", file=sys.stderr)
        return 3
    proc.send_signal(signal.SIGHUP)
    print(f"sent SIGHUP to master {proc.pid}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    proc, path = _master(args)
    if proc is None:
        print(f"lancelotd: not running (no live master in PID file {path})", file=sys.stderr)
        return 3
    proc.send_signal(signal.SIGQUIT if args.fast else signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while is_alive(proc):
        if time.monotonic() > deadline:
            print(f"lancelotd: master {proc.pid} still running after {args.timeout:g}s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"stopped master {proc.pid}")
    return 0


def is_alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (an exited master its parent has not reaped yet)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
