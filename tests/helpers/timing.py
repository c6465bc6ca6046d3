"""Time in the tests: one factor for every wait, and waiting on a condition rather than sleeping.

Every wait and every timing threshold of the tests goes through `scaled()`, which multiplies
seconds by ``LANCELOTD_TEST_TIME_FACTOR`` (a positive number, default 1.0).  On a loaded CI
runner or under a sanitizer, ``LANCELOTD_TEST_TIME_FACTOR=3 pytest`` gives every `wait_for`,
every "answered in under 100 ms" and every "replaced within a second" three times as long.
What the daemon is configured to do (a graceful_timeout, a watchdog interval) and the
observation windows of a load pattern are not scaled: they are the behaviour under test,
not the patience of the test.
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
