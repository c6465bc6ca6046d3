"""Issue 21, item 5: what operators plug in, checked against what the daemon exports.

- etc/prometheus/lancelotd.rules.yml passes `promtool check rules`, and behaves as
  tests/promtool/lancelotd.rules.test.yml says (`promtool test rules`); promtool is Debian's
  `prometheus` package (.ci/run installs it as root), and the tests skip without it.
- Every metric a rule or a query of etc/grafana/lancelotd.json names is one a running daemon
  exports (scraped from a real one, with workers, after a reload).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess

import pytest
from helpers import NAME_Q, REPO, metrics_url, scaled, scrape, status_config, wait_metrics

RULES = REPO / "etc/prometheus/lancelotd.rules.yml"
RULES_TEST = REPO / "tests/promtool/lancelotd.rules.test.yml"
DASHBOARD = REPO / "etc/grafana/lancelotd.json"
NAME = re.compile(r"\blancelotd_[a-z_]+\b")
PROMETHEUS_OWN = {"up"}  # what Prometheus adds to every target


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; .ci/run installs it as root)")
    return path


def test_promtool_check_rules():
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True,
                            timeout=scaled(60))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 8 rules found" in result.stdout


def test_promtool_test_rules():
    result = subprocess.run([promtool(), "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                            timeout=scaled(60))
    assert result.returncode == 0, result.stdout + result.stderr


def queries() -> list[tuple[str, str]]:
    """(where, expression) of every rule and every dashboard query."""
    found = [(f"rules: {m.group(1)}", m.group(2)) for m in re.finditer(
        r"- alert: (\S+)\n\s+expr: (>\n(?:\s{10}.*\n)+|.*)", RULES.read_text())]
    dashboard = json.loads(DASHBOARD.read_text())
    found += [(f"dashboard: {panel['title']}", target["expr"])
              for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(found) > 20, found
    return found


def test_every_query_names_an_exported_metric(start_daemon):
    d = start_daemon(config=status_config(workers=2, server='metrics_bind = "127.0.0.1:0"'), workers=2)
    url = metrics_url(d, d.proc.pid)
    d.ask(NAME_Q)
    d.signal(signal.SIGHUP)  # reload counters, a second generation
    samples = wait_metrics(url, {("lancelotd_generation", ()): 2,
                                 ("lancelotd_workers", (("state", "serving"),)): 2})
    exported = {name for name, _ in samples} | {name for name, _ in scrape(url)}
    unknown = [(where, name) for where, expr in queries() for name in NAME.findall(expr)
               if name not in exported]
    assert not unknown, f"not exported: {unknown}\nexported: {sorted(exported)}"
    for where, expr in queries():
        names = set(NAME.findall(expr)) | ({"up"} & set(re.findall(r"\b\w+\b", expr)))
        assert names, f"{where}: {expr!r} names no metric"
        assert names <= exported | PROMETHEUS_OWN


def test_no_series_is_labelled_by_pid(start_daemon):
    d = start_daemon(config=status_config(workers=2, server='metrics_bind = "127.0.0.1:0"'), workers=2)
    url = metrics_url(d, d.proc.pid)
    samples = wait_metrics(url, {("lancelotd_workers", (("state", "serving"),)): 2})
    labelled = {name for name, labels in samples if any(key == "pid" for key, _ in labels)}
    assert not labelled, labelled
