"""The man pages (man/) cannot drift from the code.

Every option that `--help` lists, of `lancelotd` and each of its commands and of `lancelot ask`,
must be in its man page, and every setting lancelotd/config.py knows in lancelotd.toml(5), in
the section of its table.  groff must render each page without a warning (`-ww`).  In-process
and fast: the package build (debian/rules) runs this module too.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import scaled

from lancelotd import __version__, cli, client, config

MAN = Path(__file__).resolve().parents[1] / "man"
PAGES = ("lancelotd.8", "lancelotd.toml.5", "lancelot.1")
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def plain(page: str) -> str:
    """The page's roff source with the escapes that hide words removed (\\- is -, fonts go)."""
    text = (MAN / page).read_text()
    text = re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-").replace("\\&", "")
    return text.replace('\\(dq', '"')


def help_text(main: Callable[[list[str]], int], argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return out.getvalue()


def listed_options(text: str) -> set[str]:
    """The option strings of a --help text's option lines (not the words of their help)."""
    options = set()
    for line in text.splitlines():
        if line.startswith("  -"):
            options.update(OPTION.findall(line.split("  ", 2)[1] if "  " in line[2:] else line))
    return options


def mentioned(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def lancelotd_helps() -> dict[str, str]:
    helps = {"lancelotd": help_text(cli.main, ["--help"])}
    for command in cli.COMMANDS:
        helps[f"lancelotd {command}"] = help_text(cli.main, [command, "--help"])
    return helps


def test_every_command_is_in_lancelotd_8() -> None:
    page = plain("lancelotd.8")
    top = help_text(cli.main, ["--help"])
    for command in cli.COMMANDS:
        assert command in top, f"{command} is not in lancelotd --help: the test is out of date"
        assert re.search(rf"^\.B {re.escape(command)}$", page, re.M), \
            f"lancelotd {command} is not in lancelotd(8)"


@pytest.mark.parametrize("where", ["lancelotd", *(f"lancelotd {c}" for c in cli.COMMANDS)])
def test_every_option_of_lancelotd_is_in_lancelotd_8(where: str) -> None:
    options = listed_options(lancelotd_helps()[where])
    assert options, f"no options parsed from `{where} --help`"
    page = plain("lancelotd.8")
    missing = sorted(o for o in options if not mentioned(o, page))
    assert not missing, f"`{where} --help` lists {missing}, which lancelotd(8) does not mention"


@pytest.mark.parametrize("argv", [["--help"], ["ask", "--help"]])
def test_every_option_of_lancelot_is_in_lancelot_1(argv: list[str]) -> None:
    options = listed_options(help_text(client.main, argv))
    assert options
    page = plain("lancelot.1")
    missing = sorted(o for o in options if not mentioned(o, page))
    assert not missing, f"`lancelot {' '.join(argv)}` lists {missing}, which lancelot(1) does not mention"


def sections(page: str) -> dict[str, str]:
    """.SH title -> its text."""
    parts = re.split(r'^\.SH "?([^"\n]*)"?$', plain(page), flags=re.M)
    return {title: body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_every_setting_is_in_its_table_in_lancelotd_toml_5() -> None:
    found = sections("lancelotd.toml.5")
    known = [(f"[{table}]", key) for table, key in config.SETTINGS]
    known += [("[[listener]]", key) for key in config.LISTENER_KEYS]
    missing = [f"{table} {key}" for table, key in known
               if not re.search(rf"^\.B {re.escape(key)}$", found.get(table, ""), re.M)]
    assert not missing, f"lancelotd.toml(5) does not describe {missing} (a .TP entry under .SH \"[table]\")"
    assert "[answers]" in found
    tables = {f"[{t}]" for t in config.TABLES if t != "listener"} | {"[[listener]]"}
    assert tables <= set(found), f"tables without a section: {sorted(tables - set(found))}"


def test_every_setting_entry_gives_its_default() -> None:
    without = []
    for table, text in sections("lancelotd.toml.5").items():
        keys = {key for t, key in config.SETTINGS if f"[{t}]" == table}
        entries = re.split(r"^\.TP\n", text, flags=re.M)[1:]
        without += [f"{table} {e.split(chr(10))[0][3:]}" for e in entries
                    if e.split("\n")[0][3:] in keys and "Default" not in e]
    assert not without, f"settings without their default in lancelotd.toml(5): {without}"


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_carry_the_version(page: str) -> None:
    header = next(line for line in plain(page).splitlines() if line.startswith(".TH "))
    assert f'"lancelotd {__version__}"' in header, f"{page}: .TH says {header!r}, not version {__version__}"


@pytest.mark.parametrize("page", PAGES)
def test_groff_renders_without_a_warning(page: str) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (apt-get install groff-base)")
    result = subprocess.run(["groff", "-man", "-ww", "-z", str(MAN / page)], capture_output=True, text=True,
                            timeout=scaled(60))
    assert result.returncode == 0 and not result.stderr, f"groff on {page}:\n{result.stderr}"
