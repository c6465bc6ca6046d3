"""Descriptor limits: raised at start, and compared with what the config asks for."""

from __future__ import annotations

import resource

from .logs import log

RESERVED_FDS = 32  # a worker's own descriptors: listeners, epoll, pipes, log, hand-off channels


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: each connection is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)


def nofile_advice(max_connections: int) -> str | None:
    """What will happen when max_connections does not fit the descriptor limit; None if it fits."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or max_connections + RESERVED_FDS <= soft:
        return None
    usable = max(soft - RESERVED_FDS, 1)
    return (f"max_connections {max_connections} does not fit the descriptor limit {soft} (RLIMIT_NOFILE): "
            f"a worker will hold about {usable} connections, then pause accepting for 0.5s at a time "
            f"until one closes; raise LimitNOFILE= / ulimit -n or lower max_connections")
