"""Config validation (SPEC §4): every problem reported, with its key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lancelotd import config
from lancelotd.config import Config, ConfigError, from_dict

REPO = Path(__file__).resolve().parent.parent


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    return e.value.problems


def test_empty_file_is_the_defaults() -> None:
    assert from_dict({}) == Config()


def test_answers_only_is_complete() -> None:
    cfg = from_dict({"answers": {"Ni?": "Ekke."}})
    assert cfg.answers == {"Ni?": "Ekke."}
    assert cfg.bind == ("0.0.0.0:1060",)


# Defaults that depend on the user running lancelotd: the file shows them as comments.
SHOWN_COMMENTED = {("server", "pid_file")}


def test_shipped_config_is_valid_and_complete() -> None:
    text = (REPO / "etc" / "lancelotd.toml").read_text()
    data = tomllib.loads(text)
    cfg = from_dict(data)
    assert cfg.answers == config.DEFAULT_ANSWERS
    for table, key in config.SETTINGS:
        if (table, key) in SHOWN_COMMENTED:
            assert f"\n# {key} = " in text, f"etc/lancelotd.toml lacks the commented {table}.{key}"
        else:
            assert key in data.get(table, {}), f"etc/lancelotd.toml lacks {table}.{key}"


def test_unknown_keys_and_tables_are_rejected() -> None:
    found = problems({"server": {"bind": ["127.0.0.1:1"], "wrokers": 2}, "extra": {}})
    assert any(p.startswith("server.wrokers: unknown setting") for p in found)
    assert any(p.startswith("extra: unknown table") for p in found)


def test_every_problem_is_reported() -> None:
    found = problems({
        "server": {"workers": 0, "bind": ["nohost"], "backlog": -1},
        "protocol": {"max_question_bytes": "big", "idle_timeout": 0, "unknown_answer": "No"},
        "log": {"level": "loud"},
        "answers": {"Why": "Because.", "Who?": "Me", "Wh\u00e9re?": "Here.", "A??": "B.", "C?": "D.E."},
    })
    keys = sorted(p.split(":")[0] for p in found)
    assert keys == sorted([
        "server.workers", "server.bind", "server.backlog", "protocol.max_question_bytes",
        "protocol.idle_timeout", "protocol.unknown_answer", "log.level",
        "answers.'Why'", "answers.'Who?'", "answers.'Wh\u00e9re?'", "answers.'A??'", "answers.'C?'",
    ])


def test_workers_auto_and_booleans() -> None:
    assert from_dict({"server": {"workers": "auto"}}).workers == config.cpu_count()
    assert any(p.startswith("server.workers") for p in problems({"server": {"workers": True}}))


def test_ipv6_and_port_zero_addresses() -> None:
    cfg = from_dict({"server": {"bind": ["[::1]:0", "127.0.0.1:1060", ":1061"]}})
    assert cfg.bind == ("[::1]:0", "127.0.0.1:1060", ":1061")
    assert problems({"server": {"bind": ["::1:1060"]}})
    assert problems({"server": {"bind": ["127.0.0.1:70000"]}})
    assert problems({"server": {"bind": []}})


def test_question_longer_than_limit() -> None:
    found = problems({"protocol": {"max_question_bytes": 4}, "answers": {"Long one?": "Yes."}})
    assert found == ["answers.'Long one?': question is longer than max_question_bytes (4)"]


def test_load_reports_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(str(tmp_path / "missing.toml"))


def test_overrides() -> None:
    cfg = Config().with_overrides(bind=["127.0.0.1:0"], workers=3, pid_file=None)
    assert cfg.bind == ("127.0.0.1:0",) and cfg.workers == 3 and cfg.pid_file == Config().pid_file
