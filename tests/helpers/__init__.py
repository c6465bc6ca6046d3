"""Helpers shared by the tests: one definition each, imported by the test modules as `from helpers
import ...` (conftest.py holds the fixtures alone; no test module imports another).

One module per concern:

* timing: the one time factor (LANCELOTD_TEST_TIME_FACTOR, `scaled`, its rule) and `wait_for`;
* procs: the daemon's pool as `ps` shows it, and the reaping of every process a test starts;
* sockets: which process holds which TCP socket, asked of the kernel;
* talk: the default answers, clients, and threads whose every failure the test sees;
* daemon: a `lancelotd serve` started by a test, its log and readiness;
* cli: lancelotd's commands and the `lancelot` client run to their end;
* status: `status --json` (its documented schema) and the master's metrics endpoint;
* handoff: configs and clients that tell which generation answered, and hand-off log lines;
* systemd: the notify socket and a start as socket activation makes it;
* load: tests/lancelot_load.py in another network namespace, driven line by line.
"""

from .cli import (
    BIN,
    NOBODY,
    REPO,
    ROOT,
    as_user,
    clean_env,
    lancelot_cli,
    lancelotd_cli,
    reachable_by_others,
    status_json,
)
from .daemon import LISTENING, Daemon, read, read_pid, ready_from, wait_log
from .handoff import (
    BLUE,
    GRACE,
    GREEN,
    HANDED,
    HANDOFF_Q,
    ROTATION,
    ROTATION_ANSWERS,
    Client,
    ExactlyOnce,
    handed,
    handoff_conf,
    rewrite,
)
from .load import LOAD_CLIENT, LoadClient, load_client_timeouts, sandbox_load
from .procs import (
    PR_SET_CHILD_SUBREAPER,
    WORKER_TITLE,
    Key,
    become_subreaper,
    dead_pid,
    descendants,
    describe,
    gone,
    live_children,
    reap_group,
    reap_strays,
    sleeping_in,
    strays,
    syscall_is,
    title,
    wait_child_exit,
    wait_pool,
    workers_of,
)
from .sockets import (
    SYS_PIDFD_GETFD,
    TCP_STATES,
    Addr,
    TcpSocket,
    held,
    holder_of,
    listening_ports,
    open_files,
    server_inode,
    server_rx_queue,
    tcp_sockets,
)
from .status import (
    ERRORS,
    INT,
    METRICS_LINE,
    NOT_RUNNING_KEYS,
    NUM,
    PROXY,
    REFUSED,
    RUNNING_SCHEMA,
    ZERO_PROXY_COUNTERS,
    ZERO_REFUSED,
    ListOf,
    OneOf,
    Opt,
    Samples,
    assert_running_schema,
    metrics_url,
    schema_problems,
    scrape,
    status_config,
    value,
    wait_equal,
    wait_metrics,
    wait_refused,
)
from .systemd import WRAPPER, Message, NotifySocket, Wrapped
from .talk import (
    COLOR_A,
    COLOR_Q,
    NAME_A,
    NAME_Q,
    NOT_ASCII,
    QUEST_A,
    QUEST_Q,
    TOO_LONG,
    Asker,
    Backlog,
    CheckedThread,
    admitted,
    ask,
    ask_on,
    closed_by_server,
    connect,
    outcome,
    recv_all,
    recv_until,
    served,
)
from .timing import TIME_FACTOR, scaled, wait_for

__all__ = [
    "Addr", "Asker", "BIN", "BLUE", "Backlog", "COLOR_A", "COLOR_Q", "CheckedThread", "Client",
    "admitted", "served",
    "Daemon", "ERRORS", "ExactlyOnce", "GRACE", "GREEN", "HANDED", "HANDOFF_Q", "INT", "Key",
    "LISTENING", "LOAD_CLIENT", "ListOf", "LoadClient", "METRICS_LINE", "Message", "NAME_A", "NAME_Q",
    "NOBODY", "NOT_ASCII", "NOT_RUNNING_KEYS", "NUM", "NotifySocket", "OneOf", "Opt", "PROXY",
    "PR_SET_CHILD_SUBREAPER", "QUEST_A", "QUEST_Q", "REFUSED", "REPO", "ROOT", "ROTATION",
    "ROTATION_ANSWERS", "RUNNING_SCHEMA", "SYS_PIDFD_GETFD", "Samples", "TCP_STATES", "TIME_FACTOR",
    "TOO_LONG", "TcpSocket", "WORKER_TITLE", "WRAPPER", "Wrapped", "ZERO_PROXY_COUNTERS",
    "ZERO_REFUSED", "as_user", "ask", "ask_on", "assert_running_schema", "become_subreaper",
    "clean_env", "closed_by_server", "connect", "dead_pid", "descendants", "describe", "gone", "handed",
    "handoff_conf", "held", "holder_of", "lancelot_cli", "lancelotd_cli", "listening_ports",
    "live_children", "load_client_timeouts", "metrics_url", "open_files", "outcome",
    "reachable_by_others", "read", "read_pid", "ready_from",
    "reap_group", "reap_strays", "recv_all", "recv_until", "rewrite", "sandbox_load", "scaled",
    "schema_problems", "scrape", "server_inode", "server_rx_queue", "sleeping_in", "status_config",
    "status_json", "strays", "syscall_is", "tcp_sockets", "title", "value", "wait_child_exit",
    "wait_equal", "wait_for", "wait_log",
    "wait_metrics", "wait_pool", "wait_refused", "workers_of",
]
