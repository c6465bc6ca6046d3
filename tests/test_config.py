"""Config validation (docs/PROMISES.md §3): every problem reported, with its key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from helpers import REPO, lancelotd_cli, wait_for

from lancelotd import checks, config
from lancelotd.config import Config, ConfigError, from_dict
from lancelotd.scoreboard import SLOTS


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
    assert from_dict({"server": {"workers": "auto"}}).workers == min(config.cpu_count(), config.MAX_WORKERS)
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


# --- bounds (issue 9, item 8): each refused with its key -----------------------------------


def keys_of(data: dict) -> list[str]:
    return [p.split(":")[0] for p in problems(data)]


def test_workers_fit_two_generations_in_the_scoreboard() -> None:
    most = SLOTS // 2
    assert from_dict({"server": {"workers": most}}).workers == most
    found = problems({"server": {"workers": most + 1}})
    assert len(found) == 1 and found[0].startswith("server.workers:") and str(most) in found[0]


def test_backlog_fits_listen() -> None:
    assert from_dict({"server": {"backlog": 65535}}).backlog == 65535
    assert keys_of({"server": {"backlog": 65536}}) == ["server.backlog"]
    assert keys_of({"server": {"backlog": 2**31}}) == ["server.backlog"]


def test_worker_timeout_at_least_a_second() -> None:
    assert from_dict({"lifecycle": {"worker_timeout": 1}}).worker_timeout == 1
    assert keys_of({"lifecycle": {"worker_timeout": 0.5}}) == ["lifecycle.worker_timeout"]


def test_max_question_bytes_bounded() -> None:
    assert from_dict({"protocol": {"max_question_bytes": 65536}}).max_question_bytes == 65536
    assert keys_of({"protocol": {"max_question_bytes": 65537}}) == ["protocol.max_question_bytes"]


def test_answer_length_bounded() -> None:
    longest = "A" * (checks.MAX_ANSWER_BYTES - 1) + "."
    too_long = "A" + longest
    cfg = from_dict({"protocol": {"unknown_answer": longest}, "answers": {"Q?": longest}})
    assert cfg.unknown_answer == longest
    assert keys_of({"protocol": {"unknown_answer": too_long}}) == ["protocol.unknown_answer"]
    assert keys_of({"answers": {"Q?": too_long}}) == ["answers.'Q?'"]
    assert str(checks.MAX_ANSWER_BYTES) in problems({"answers": {"Q?": too_long}})[0]


@pytest.mark.parametrize("bind", [
    ["127.0.0.1:1060", "127.0.0.1:1060"],
    [":1060", "0.0.0.0:1060"],
    ["[::1]:1060", "[::1]:1060"],
    ["[::1]:1060", "[0:0::1]:1060"],
    ["127.0.0.1:0", "127.0.0.1:0"],  # one socket per address: the second would be lost
    ["0.0.0.0:1060", "127.0.0.1:1060"],  # the wildcard already holds the port (EADDRINUSE)
    ["[::1]:1060", "[::]:1060"],
])
def test_duplicate_bind_addresses_refused(bind: list[str]) -> None:
    found = problems({"server": {"bind": bind}})
    assert len(found) == 1 and found[0].startswith("server.bind:"), found
    assert bind[1] in found[0]


def test_distinct_bind_addresses_accepted() -> None:
    bind = ["0.0.0.0:1060", "[::]:1060", "127.0.0.1:0", ":0", "127.0.0.2:1061", "[::1]:1061"]
    assert from_dict({"server": {"bind": bind}}).bind == tuple(bind)


def test_metrics_bind_apart_from_the_service() -> None:
    found = problems({"server": {"bind": ["127.0.0.1:1060"], "metrics_bind": "0.0.0.0:1060"}})
    assert len(found) == 1 and found[0].startswith("server.metrics_bind:"), found
    assert from_dict({"server": {"bind": ["127.0.0.1:1060"], "metrics_bind": "127.0.0.1:9100"}})


def test_log_file_directory_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "lancelotd.log"
    found = problems({"log": {"file": str(missing)}})
    assert len(found) == 1 and found[0].startswith("log.file:") and "does not exist" in found[0]
    found = problems({"log": {"file": str(tmp_path)}})
    assert len(found) == 1 and found[0].startswith("log.file:") and "directory" in found[0]
    assert from_dict({"log": {"file": str(tmp_path / "x.log")}}).log_file == str(tmp_path / "x.log")
    # a relative path is checked against the directory it will be resolved against
    (tmp_path / "logs").mkdir()
    assert from_dict({"log": {"file": "logs/x.log"}}, base_dir=str(tmp_path)).log_file == "logs/x.log"
    assert keys_of({"log": {"file": "no-such-dir/x.log"}}) == ["log.file"]


@pytest.mark.parametrize("table, key", [
    ("protocol", "idle_timeout"), ("lifecycle", "graceful_timeout"), ("lifecycle", "worker_timeout")])
def test_timeouts_are_finite_and_at_most_a_day(table: str, key: str) -> None:
    assert from_dict({table: {key: config.MAX_SECONDS}})
    for value in (config.MAX_SECONDS + 1, float("inf"), float("nan")):
        assert keys_of({table: {key: value}}) == [f"{table}.{key}"], value


def test_max_connections_bounded() -> None:
    assert from_dict({"protocol": {"max_connections": config.MAX_CONNECTIONS}})
    too_many = config.MAX_CONNECTIONS + 1
    assert keys_of({"protocol": {"max_connections": too_many}}) == ["protocol.max_connections"]


def test_jitter_needs_max_requests() -> None:
    cfg = from_dict({"lifecycle": {"max_requests": 1000, "max_requests_jitter": 100}})
    assert cfg.max_requests_jitter == 100
    assert keys_of({"lifecycle": {"max_requests_jitter": 100}}) == ["lifecycle.max_requests_jitter"]


def test_overrides_are_validated_and_name_the_option() -> None:
    with pytest.raises(ConfigError) as e:
        Config().with_overrides(workers=100000)
    assert [p.split(":")[0] for p in e.value.problems] == ["--workers"]
    with pytest.raises(ConfigError) as e:
        Config().with_overrides(bind=["127.0.0.1:1", "127.0.0.1:1"])
    assert [p.split(":")[0] for p in e.value.problems] == ["--bind"]


# --- the same verdicts from the real command ------------------------------------------------


def test_check_config_reports_bounds_with_their_keys(tmp_path: Path) -> None:
    path = tmp_path / "bounds.toml"
    path.write_text(f"""
[server]
bind = ["127.0.0.1:1060", ":1061", "0.0.0.0:1061"]
workers = 100000
backlog = 100000

[log]
file = "{tmp_path}/missing/lancelotd.log"
""")
    result = lancelotd_cli("check-config", "-c", str(path))
    assert result.returncode == 1, result
    assert result.stdout == ""
    for key in ("server.bind", "server.workers", "server.backlog", "log.file"):
        assert f"{path}: {key}:" in result.stderr, (key, result.stderr)
    assert "Traceback" not in result.stderr


def test_serve_refuses_too_many_workers_on_the_command_line(start_daemon) -> None:
    daemon = start_daemon("-w", "100000", wait=False)

    def exited() -> bool:
        assert not daemon.pid_file.exists(), f"it started with -w 100000:\n{daemon.log()}"
        return daemon.proc.poll() is not None
    wait_for(exited, 20, "lancelotd to refuse -w 100000")
    assert daemon.proc.returncode == 1
    assert "--workers" in daemon.log() and str(SLOTS // 2) in daemon.log(), daemon.log()
    assert "Traceback" not in daemon.log()


def test_relative_log_file_is_checked_where_serve_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A reload after --daemon's chdir("/") checks logs/x.log in the start directory, not in /."""
    from lancelotd.cli import build_parser, config_loader

    (tmp_path / "logs").mkdir()
    (tmp_path / "lancelotd.toml").write_text('[log]\nfile = "logs/x.log"\n')
    monkeypatch.chdir(tmp_path)
    configure = config_loader(build_parser().parse_args(["serve", "-c", "lancelotd.toml"]))
    monkeypatch.chdir("/")
    assert configure().log_file == str(tmp_path / "logs" / "x.log")
