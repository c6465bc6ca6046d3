"""Time in the tests: one factor for every wait, and waiting on a condition rather than sleeping.

``LANCELOTD_TEST_TIME_FACTOR`` (a positive number, default 1.0) stretches the patience of the
tests: on a loaded CI runner or under a sanitizer, ``LANCELOTD_TEST_TIME_FACTOR=3 pytest`` gives
every wait and every timing threshold three times as long.  The rule, applied once:

* Scaled, exactly once, through `scaled()`: every timeout a test owns - a socket's
  (``settimeout``, ``create_connection(timeout=)``), a subprocess's (``run(timeout=)``,
  ``wait()``, ``communicate()``), a thread's ``join()``, a queue's ``get()``, a ``select`` that
  waits for an event, a hand-made deadline (``time.monotonic() + scaled(10)``), the timeouts
  handed to other programs (``loadgen -T``, ``lancelot_load.py --timeout``, ``lancelot ask -t``,
  ``lancelotd stop --timeout``) - and every threshold on time ("answered in under 100 ms",
  "replaced within a second").  Not a share of the CPU: a spinning process burns all of it
  whatever the factor, so such a threshold is capped below that.
* Once only: the helpers (`wait_for` here; ``wait_log``, ``wait_pool``, ``Daemon.connect``,
  ``lancelotd_cli``, ... - every function of tests/ with a ``timeout`` parameter) take the base
  seconds and scale them themselves; their callers never pass ``scaled(...)``.
* Not scaled: poll and pacing periods (``time.sleep(0.01)`` in a poll loop, a client's pause
  between questions; marked ``# unscaled: <why>`` where they look like timeouts), the
  observation windows of a load pattern, and the lengths of deliberate faults (a worker that
  sleeps 300 s), which are the behaviour under test, not the patience of the test - unless the
  fault must outlast a timer that is scaled (see below): then it is scaled with it.
* The daemon's own timers (``worker_timeout``, ``idle_timeout``, ``drain_delay``,
  ``max_connection_age``, ``WATCHDOG_USEC``, a test-only boot delay or upgrade timeout) are the
  behaviour under test, so the factor does not reach them by itself; each test chooses them so
  that the factor can rescue it.  When a test waits for a timer to fire, the timer is
  `scaled(base)` and the waits around it take `base` (the helpers scale it); thresholds derived
  from the timer are in its units (a watchdog ping every half ``WatchdogSec``).  When a test
  shows that something happens before a timer (a busy client never closed as idle, a signal
  that arrives during a boot delay), the timer is scaled so that the slower machine still beats
  it.  Timers the daemon fixes itself (its boot back-off, its PROXY header timeout) are left to
  generous bounds.  A test whose timing no factor could rescue would say why in its docstring and
  skip unless TIME_FACTOR == 1 (none needs to today).

tests/test_time_factor.py reads the source of tests/ and fails on a number as a standard-library
timeout, on ``scaled(...)`` handed to a helper, and on a helper's ``timeout`` handed on unscaled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def _time_factor() -> float:
    raw = os.environ.get("LANCELOTD_TEST_TIME_FACTOR", "1")
    try:
        factor = float(raw)
    except ValueError:
        raise SystemExit(f"LANCELOTD_TEST_TIME_FACTOR={raw!r} is not a number") from None
    if not factor > 0:
        raise SystemExit(f"LANCELOTD_TEST_TIME_FACTOR={raw!r} must be above 0")
    return factor


TIME_FACTOR = _time_factor()


def scaled(seconds: float) -> float:
    """`seconds` stretched by LANCELOTD_TEST_TIME_FACTOR (see the module docstring)."""
    return seconds * TIME_FACTOR


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy; fail after scaled(`timeout`)."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)

