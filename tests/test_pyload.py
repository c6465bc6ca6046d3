"""tests/pyload.py, the fallback load generator, against real daemons: it counts answers and
classifies errors as loadgen.c does, in the same result line."""

from __future__ import annotations

import subprocess

import pytest
from helpers import COLOR_Q, NAME_A, NAME_Q, QUEST_A, QUEST_Q, scaled
from loadgen import LOADGEN_SRC, PYLOAD, assert_no_errors, build, load

# The result line's keys, in loadgen.c's order (tests/loadgen.py reads either tool's line).
KEYS = ("label mode host port conns threads duration_s warmup_s nsrc rps requests errors err_wrong "
        "err_reset err_refused err_timeout err_other connects starved slot_min slot_max p50_us p90_us "
        "p99_us p999_us max_us mean_us lg_cpu_user_s lg_cpu_sys_s lg_wall_s first_error").split()


@pytest.mark.parametrize("per_request", [False, True], ids=["persistent", "per-request"])
def test_every_answer_right_no_errors(start_daemon, per_request):
    d = start_daemon(workers=2)
    with load(PYLOAD, d.port, conns=20, seconds=1.0, per_request=per_request) as result:
        pass
    assert_no_errors(result)
    assert list(result) == KEYS
    assert result["mode"] == ("cpr" if per_request else "persistent")
    assert int(result["starved"]) == 0 and int(result["slot_min"]) > 0, result
    assert int(result["p50_us"]) <= int(result["p99_us"]) <= int(result["max_us"]), result


def test_a_different_answer_counts_as_wrong(start_daemon):
    table = {NAME_Q: NAME_A, QUEST_Q: QUEST_A, COLOR_Q: b"Green."}
    d = start_daemon(workers=1, config="[answers]\n" + "".join(f'"{q.decode()}" = "{a.decode()}"\n'
                                                              for q, a in table.items()))
    assert d.ask(COLOR_Q) == b"Green."
    with load(PYLOAD, d.port, conns=3, seconds=0.5) as result:
        pass
    # one question in three is the colour; the others are answered right
    assert int(result["err_wrong"]) > 0, result
    assert int(result["requests"]) > 0, result
    assert int(result["errors"]) == int(result["err_wrong"]), result
    assert result["first_error"] == "wrong:-", result


def test_nobody_listening_counts_as_refused():
    with load(PYLOAD, 1, conns=2, seconds=0.3) as result:
        pass
    assert result["requests"] == "0" and int(result["err_refused"]) > 0, result
    assert int(result["errors"]) == int(result["err_refused"]), result


def test_same_result_line_as_the_c_loadgen(start_daemon, tmp_path):
    if not LOADGEN_SRC.exists():
        pytest.skip(f"no C loadgen to compare with at {LOADGEN_SRC}")
    command = build(tmp_path)
    if command == PYLOAD:
        pytest.skip("the C loadgen was not built (no compiler, or LANCELOTD_TEST_PYLOAD=1)")
    d = start_daemon(workers=1)
    with load(command, d.port, conns=2, seconds=0.3) as result:
        pass
    assert list(result) == KEYS


def test_bad_options_exit_2_like_loadgen():
    for args in (["-c", "0"], ["-H", "localhost"], ["-x"]):
        done = subprocess.run([*PYLOAD, *args], capture_output=True, text=True, timeout=scaled(30))
        assert done.returncode == 2, (args, done.stderr)
