"""The time factor's rule (tests/helpers/timing.py), checked on the source of every test file.

The rule: a timeout handed to the standard library (a socket, a subprocess, a thread, a
queue, select) is `scaled(...)`; a timeout handed to a helper of the tests (`wait_for`,
`wait_log`, `Daemon.connect`, ... - any function of tests/ with a `timeout` parameter) is the
base in seconds, since the helper scales it once.  This test reads tests/ with `ast` and lists
the calls that break it:

* a number as the timeout of a standard-library call (unscaled);
* `scaled(...)` as the timeout of a helper (scaled twice);
* a helper's own `timeout` parameter handed on to the standard library as it is (unscaled).

A literal that is no timeout (a pacing period such as `stop.wait(0.2)`) says so with a
``# unscaled: <why>`` comment on its line.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import TIME_FACTOR, scaled, wait_for

TESTS = Path(__file__).resolve().parent
# Calls qualified by these modules are the standard library's, whatever their name.
STDLIB_MODULES = frozenset({"subprocess", "socket", "select", "request", "queue", "threading"})
# Methods of the standard library's objects whose first argument is a timeout.
FIRST_ARG_TIMEOUT = frozenset({"settimeout", "wait", "join", "communicate"})
# Where a module-qualified call takes its timeout positionally.
POSITIONAL_TIMEOUT = {"create_connection": 1, "select": 3, "urlopen": 2}
OPT_OUT = "# unscaled:"


def _callee(call: ast.Call) -> tuple[str | None, str]:
    """(the name of the module or object it is called on, or None; the function's name)."""
    func = call.func
    if isinstance(func, ast.Attribute):
        owner = func.value
        qualifier = owner.id if isinstance(owner, ast.Name) else \
            owner.attr if isinstance(owner, ast.Attribute) else ""
        return qualifier, func.attr
    if isinstance(func, ast.Name):
        return None, func.id
    return None, ""


def _is_number(node: ast.AST) -> bool:
    """A literal number other than 0 (0 is a poll, not a wait), or arithmetic of such."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, int | float) and not isinstance(node.value, bool) and node.value != 0
    if isinstance(node, ast.BinOp):
        return all(isinstance(n, ast.Constant) for n in (node.left, node.right))
    return False


def _scales(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "scaled"
               for n in ast.walk(node))


def _helpers(trees: dict[Path, ast.Module]) -> dict[str, set[int]]:
    """Functions of tests/ with a `timeout` parameter: name -> its positional index (self left out)."""
    found: dict[str, set[int]] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names = [a.arg for a in node.args.args if a.arg not in ("self", "cls")]
                kwonly = [a.arg for a in node.args.kwonlyargs]
                if "timeout" in names:
                    found.setdefault(node.name, set()).add(names.index("timeout"))
                elif "timeout" in kwonly:
                    found.setdefault(node.name, set())
    return found


def _is_helper_call(call: ast.Call, qualifier: str | None, name: str, helpers: dict[str, set[int]]) -> bool:
    """Whether this calls a helper of tests/ (which scales its own timeout).  `wait` is both a helper's
    name (NotifySocket.wait(predicate, ...)) and the standard library's (a child's or an Event's
    wait(timeout)): the helper's first argument is a predicate (a lambda or a name)."""
    if qualifier in STDLIB_MODULES or name not in helpers:
        return False
    if name == "wait":
        return bool(call.args) and isinstance(call.args[0], ast.Lambda | ast.Name)
    return True


def _stdlib_timeout(call: ast.Call, qualifier: str | None, name: str) -> ast.AST | None:
    """The timeout argument of a standard-library call, if it has one."""
    if qualifier in STDLIB_MODULES:
        index = POSITIONAL_TIMEOUT.get(name)
    elif qualifier is not None and name in FIRST_ARG_TIMEOUT | {"get"}:
        index = 0 if name in FIRST_ARG_TIMEOUT else None
    else:
        return None  # a function of lancelotd's or of the tests' own
    keyword = next((k.value for k in call.keywords if k.arg == "timeout"), None)
    if keyword is not None:
        return keyword
    return call.args[index] if index is not None and len(call.args) > index else None


def _offences(path: Path, tree: ast.Module, lines: list[str], helpers: dict[str, set[int]]) -> list[str]:
    found = []

    def say(node: ast.AST, why: str) -> None:
        line = lines[node.lineno - 1]
        if OPT_OUT not in line:
            found.append(f"{path.relative_to(TESTS.parent)}:{node.lineno}: {why}: {line.strip()}")

    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    with_timeout = [f for f in functions if "timeout" in [a.arg for a in f.args.args + f.args.kwonlyargs]]
    own_timeout = {id(call) for f in with_timeout for call in ast.walk(f) if isinstance(call, ast.Call)}
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        qualifier, name = _callee(call)
        if _is_helper_call(call, qualifier, name, helpers):
            given = [k.value for k in call.keywords if k.arg == "timeout"]
            given += [call.args[i] for i in helpers[name] if i < len(call.args)]
            if any(_scales(arg) for arg in given):
                say(call, f"scaled twice ({name}() scales its timeout)")
            continue
        timeout = _stdlib_timeout(call, qualifier, name)
        if timeout is None:
            continue
        if _is_number(timeout):
            say(call, "a number as the timeout of the standard library")
        elif id(call) in own_timeout and isinstance(timeout, ast.Name) and timeout.id == "timeout":
            say(call, "the helper's timeout handed on unscaled")
    return sorted(set(found), key=lambda o: int(o.split(":")[1]))


def test_every_timeout_is_scaled_exactly_once() -> None:
    """No unscaled standard-library timeout and no helper timeout scaled twice, in all of tests/."""
    paths = sorted(p for p in TESTS.rglob("*.py") if ".venv" not in p.parts)
    texts = {p: p.read_text() for p in paths}
    trees = {p: ast.parse(text, str(p)) for p, text in texts.items()}
    helpers = _helpers(trees)
    offences = [o for p in paths for o in _offences(p, trees[p], texts[p].splitlines(), helpers)]
    assert not offences, "timeouts that break tests/helpers/timing.py's rule:\n" + "\n".join(offences)


def test_the_checker_catches_each_kind() -> None:
    """The rule's check is no check if it passes everything: one example of each offence."""
    source = (
        "def f(timeout=5):\n"
        "    sock.settimeout(5)\n"
        "    proc.wait(timeout=10)\n"
        "    socket.create_connection(addr, 3)\n"
        "    wait_for(ready, scaled(10), 'x')\n"
        "    wait_log(path, 'x', timeout=scaled(5))\n"
        "    sub.communicate(timeout=timeout)\n"
        "    stop.wait(0.2)  # unscaled: a pacing period\n"
        "    sock.settimeout(scaled(5))\n"
        "    wait_for(ready, 10, 'x')\n"
        "    notify.wait(ready, what='x')\n"
    )
    tree = ast.parse(source)
    offences = _offences(TESTS / "example.py", tree, source.splitlines(),
                         {"wait_for": {1}, "wait_log": {3}, "f": {0}})
    assert [int(o.split(":")[1]) for o in offences] == [2, 3, 4, 5, 6, 7], offences


def test_scaled_and_wait_for_use_the_factor() -> None:
    assert scaled(2) == 2 * TIME_FACTOR
    calls = []
    assert wait_for(lambda: calls.append(1) or len(calls) > 2, 1, "three polls") is True
